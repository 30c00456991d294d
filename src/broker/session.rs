//! Per-client session handles shared between the router and the connection task.
//!
//! A [`Mailbox`] is what the router holds for every subscription: the bounded
//! fast-path outbox of the client plus a few control flags (takeover, keep-alive
//! timeout, shutdown, "State has new in-flight messages for you"). It lives as
//! long as the session: one connection for a non-persistent session, across
//! connections for a persistent one. It owns no protocol logic; the connection
//! task (connection.rs) drains it.

use std::borrow::Borrow;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::auth::{Authenticator, LastDecision};
use crate::protocol::{PublishProperties, QoS};

/// One application message as routed by the broker: shared by every
/// subscriber (`Arc`), its payload never copied.
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// The retain flag of the PUBLISH as received.
    pub retain: bool,
    /// Properties passed through unchanged; never carries a topic alias,
    /// subscription identifiers or a message expiry (see `expires_at_ms`).
    pub props: PublishProperties,
    /// Wall-clock milliseconds when the message expires; 0 = never.
    pub expires_at_ms: u64,
    /// Identity of the publishing session (a `Mailbox` address) for No Local; 0 = the broker.
    pub publisher: usize,
}

impl Message {
    /// Remaining message expiry interval in seconds (rounded up) for a delivery at `now_ms`;
    /// `Err(())` when already expired.
    pub fn remaining_expiry(&self, now_ms: u64) -> Result<Option<u32>, ()> {
        if self.expires_at_ms == 0 {
            return Ok(None);
        }
        if self.expires_at_ms <= now_ms {
            return Err(());
        }
        let left = self.expires_at_ms - now_ms;
        Ok(Some(u32::try_from(left.div_ceil(1000)).unwrap_or(u32::MAX)))
    }
}

/// One copy of a message for one client on the fast path.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub msg: Arc<Message>,
    /// Effective QoS (min of message and subscription).
    pub qos: QoS,
    /// Retain flag as sent to this client.
    pub retain: bool,
    pub sub_ids: Vec<u32>,
}

/// Control flags a connection task must act on.
pub(crate) mod flag {
    pub const TAKEOVER: u8 = 1;
    pub const KEEPALIVE: u8 = 2;
    pub const SHUTDOWN: u8 = 4;
    /// State holds new in-flight messages for this session.
    pub const STATE: u8 = 8;
    /// This node stopped serving (not the leader any more): close with 0x9C.
    pub const NOT_SERVING: u8 = 16;
    /// Dynamic security changed this client's rights: close with 0x98
    /// (administrative action), no will.
    pub const KICK: u8 = 32;
}

/// Result of offering a delivery to a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    Queued,
    /// The outbox is at capacity: the delivery was dropped (slow consumer).
    Full,
    /// No connection is attached: the delivery was dropped.
    Offline,
    /// The authorization hook refused it for this client.
    Denied,
}

#[derive(Debug, Default)]
struct Inner {
    /// Connection currently attached; 0 = none (offline session).
    conn_id: u64,
    items: VecDeque<Delivery>,
    waker: Option<Waker>,
    /// What the authorization hook needs about the attached connection;
    /// boxed because most connections never need it (idle ones stay small).
    receiver: Option<Box<Receiver>>,
    /// Allocated on first use: idle sessions are counted in bytes.
    rare: Option<Box<Rare>>,
}

#[derive(Debug, Default)]
struct Receiver {
    /// Shared with the attached connection.
    username: Option<Arc<str>>,
    /// The last publishClientReceive answer for this client.
    may_receive: LastDecision,
}

#[derive(Debug, Default)]
struct Rare {
    /// Connections waiting for the attached one to finish (session takeover).
    closers: Vec<oneshot::Sender<()>>,
    /// Every filter this session subscribes (as sent, `$share/...` included),
    /// so the router can be cleaned when the session ends.
    /// Sized exactly (a `Vec` grows to 4 slots on its first push): most
    /// sessions subscribe one or two filters.
    filters: Vec<Box<str>>,
}

impl Inner {
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    /// Frees the rarely used part once it holds nothing.
    fn trim_rare(&mut self) {
        if self.rare.as_ref().is_some_and(|r| r.closers.is_empty() && r.filters.is_empty()) {
            self.rare = None;
        }
    }
}

/// The handle of one session (see the module docs).
#[derive(Debug)]
pub(crate) struct Mailbox {
    pub client_id: Arc<str>,
    /// The session lives in State (persistent, or resumed from State).
    managed: AtomicBool,
    online: AtomicBool,
    /// Coarse broker time (ms, modulo 2^32) of the last packet received, and
    /// the keep-alive limit in ms (1.5 x keep alive, at most ~27 h; 0 = none).
    /// Read by the keep-alive sweeper; 32 bits because idle connections are
    /// counted in bytes (the wrapping difference is exact for gaps under 49 days).
    last_rx_ms: AtomicU32,
    keepalive_limit_ms: AtomicU32,
    /// Which session of this client id the mailbox serves: bumped when a
    /// connection starts a new session on it. A delivery routed for an older
    /// session (routed before, pushed after) is refused rather than handed to
    /// a client that never subscribed for it. Written under `inner`'s lock.
    session: AtomicU32,
    /// Control flags (`flag::*`) for the attached connection. Read and written
    /// only under `inner`'s lock; kept outside it so `Inner` packs tighter.
    flags: AtomicU8,
    inner: Mutex<Inner>,
}

impl Mailbox {
    pub fn new(client_id: Arc<str>) -> Mailbox {
        Mailbox {
            client_id,
            managed: AtomicBool::new(false),
            online: AtomicBool::new(false),
            last_rx_ms: AtomicU32::new(0),
            keepalive_limit_ms: AtomicU32::new(0),
            session: AtomicU32::new(0),
            flags: AtomicU8::new(0),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A packet arrived from the client at coarse time `now_ms`.
    pub fn touch(&self, now_ms: u64) {
        self.last_rx_ms.store(now_ms as u32, Ordering::Relaxed);
    }

    /// Keep alive in seconds (0 = none): the client is late after 1.5 x that.
    pub fn set_keepalive(&self, keep_alive_s: u16) {
        self.keepalive_limit_ms.store(u32::from(keep_alive_s) * 1500, Ordering::Relaxed);
    }

    /// The client has been silent for longer than its keep-alive limit.
    pub fn keepalive_expired(&self, now_ms: u64) -> bool {
        let limit = self.keepalive_limit_ms.load(Ordering::Relaxed);
        let last = self.last_rx_ms.load(Ordering::Relaxed);
        let silent = (now_ms as u32).wrapping_sub(last);
        // A `last` newer than `now_ms` (another clock reading) is no silence.
        limit > 0 && silent > limit && silent < 1 << 31
    }

    /// The session a delivery routed now is for (see the field).
    pub fn session(&self) -> u32 {
        self.session.load(Ordering::Acquire)
    }

    /// The attached connection starts a new session (not a resumed one): the
    /// outbox is emptied and copies routed for earlier sessions are refused.
    /// Call it after the router has dropped the earlier session's filters, so
    /// that nothing routed from them carries the new session's number.
    pub fn start_new_session(&self) {
        let mut g = self.inner.lock();
        self.session.fetch_add(1, Ordering::AcqRel);
        g.items.clear();
    }

    /// Address used as the session identity (No Local).
    pub fn id(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    pub fn is_managed(&self) -> bool {
        self.managed.load(Ordering::Relaxed)
    }

    pub fn set_managed(&self, v: bool) {
        self.managed.store(v, Ordering::Relaxed);
    }

    /// The attached connection is closing: deliveries stop now.
    pub fn set_offline(&self) {
        self.online.store(false, Ordering::Relaxed);
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    /// Offers a fast-path delivery; never blocks. QoS 0 copies fit while the
    /// outbox holds fewer than `capacity`; QoS 1/2 copies while it holds fewer
    /// than `capacity_qos12` (they may also use the session's queue allowance).
    /// The authorization hook decides whether this client may receive the message.
    /// `session` is [`Self::session`] when the copy was routed: a copy for an
    /// earlier session counts as offline.
    pub fn push(
        &self,
        d: Delivery,
        session: u32,
        capacity: usize,
        capacity_qos12: usize,
        auth: &dyn Authenticator,
    ) -> Push {
        let waker = {
            let mut g = self.inner.lock();
            if g.conn_id == 0
                || !self.online.load(Ordering::Relaxed)
                || self.session.load(Ordering::Relaxed) != session
            {
                return Push::Offline;
            }
            let epoch = auth.decision_epoch();
            let topic = &d.msg.topic;
            let allowed = match (&mut g.receiver, epoch) {
                (None, None) => auth.can_receive(&self.client_id, None, topic),
                (r, _) => {
                    let r = r.get_or_insert_with(Box::default);
                    let username = r.username.as_deref();
                    r.may_receive.check(epoch, topic, || auth.can_receive(&self.client_id, username, topic))
                }
            };
            if !allowed {
                return Push::Denied;
            }
            let cap = if d.qos == QoS::AtMostOnce { capacity } else { capacity_qos12 };
            if g.items.len() >= cap {
                return Push::Full;
            }
            g.items.push_back(d);
            g.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Push::Queued
    }

    /// Sets control flags and wakes the attached connection (if any).
    pub fn signal(&self, f: u8) {
        let waker = {
            let mut g = self.inner.lock();
            if g.conn_id == 0 {
                return;
            }
            self.flags.fetch_or(f, Ordering::Relaxed);
            g.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Polled by the connection: returns the pending flags (cleared) when there
    /// is something to do (queued deliveries count only if `want_items`),
    /// registering the waker otherwise.
    pub fn poll_ready(&self, cx: &mut Context<'_>, want_items: bool) -> Poll<u8> {
        let mut g = self.inner.lock();
        let flags = self.flags.load(Ordering::Relaxed);
        if flags != 0 || (want_items && !g.items.is_empty()) {
            self.flags.store(0, Ordering::Relaxed);
            return Poll::Ready(flags);
        }
        match &g.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => g.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Takes up to `max` queued deliveries (FIFO) into the queue `out` gives;
    /// `out` is not called when there is nothing to take.
    pub fn drain<'a>(&self, out: impl FnOnce() -> &'a mut VecDeque<Delivery>, max: usize) {
        let mut g = self.inner.lock();
        let n = g.items.len().min(max);
        if n == 0 {
            return;
        }
        out().extend(g.items.drain(..n));
        if g.items.is_empty() && g.items.capacity() > 64 {
            // An idle connection keeps no large buffer.
            g.items = VecDeque::new();
        }
    }

    /// Attaches connection `conn_id`. If another connection is attached, it is
    /// told to go (takeover) and a receiver is returned that fires when it has
    /// finished; the caller waits for it and calls `attach` again.
    pub fn attach(&self, conn_id: u64) -> Result<(), oneshot::Receiver<()>> {
        let waker;
        let rx;
        {
            let mut g = self.inner.lock();
            if g.conn_id == 0 || g.conn_id == conn_id {
                g.conn_id = conn_id;
                self.flags.store(0, Ordering::Relaxed);
                g.items.clear();
                self.online.store(true, Ordering::Relaxed);
                return Ok(());
            }
            let (tx, r) = oneshot::channel();
            g.rare().closers.push(tx);
            self.flags.fetch_or(flag::TAKEOVER, Ordering::Relaxed);
            waker = g.waker.take();
            rx = r;
        }
        if let Some(w) = waker {
            w.wake();
        }
        Err(rx)
    }

    /// Detaches `conn_id` (if still attached) and releases connections waiting on it.
    /// Returns true when someone is waiting to take the session over.
    pub fn detach(&self, conn_id: u64) -> bool {
        let mut g = self.inner.lock();
        if g.conn_id != conn_id {
            return false;
        }
        g.conn_id = 0;
        g.items = VecDeque::new();
        self.flags.store(0, Ordering::Relaxed);
        g.waker = None;
        self.online.store(false, Ordering::Relaxed);
        let closers = g.rare.as_mut().map(|r| std::mem::take(&mut r.closers)).unwrap_or_default();
        g.trim_rare();
        let waiting = !closers.is_empty();
        for c in closers {
            let _ = c.send(());
        }
        waiting
    }

    pub fn set_username(&self, username: Option<Arc<str>>) {
        let mut g = self.inner.lock();
        g.receiver =
            username.map(|username| Box::new(Receiver { username: Some(username), ..Receiver::default() }));
    }

    /// Whether the attached connection's user name is `username`
    /// (`None` = a client without a user name).
    pub fn username_is(&self, username: Option<&str>) -> bool {
        self.inner.lock().receiver.as_ref().and_then(|r| r.username.as_deref()) == username
    }

    pub fn attached(&self) -> u64 {
        self.inner.lock().conn_id
    }

    pub fn add_filter(&self, f: &str) {
        let mut g = self.inner.lock();
        let filters = &mut g.rare().filters;
        if !filters.iter().any(|x| &**x == f) {
            filters.reserve_exact(1);
            filters.push(f.into());
        }
    }

    pub fn remove_filter(&self, f: &str) {
        let mut g = self.inner.lock();
        if let Some(r) = g.rare.as_mut() {
            r.filters.retain(|x| &**x != f);
        }
        g.trim_rare();
    }

    pub fn take_filters(&self) -> Vec<Box<str>> {
        let mut g = self.inner.lock();
        let filters = g.rare.as_mut().map(|r| std::mem::take(&mut r.filters)).unwrap_or_default();
        g.trim_rare();
        filters
    }
}

/// Client id -> session handle, online or (persistent) offline. A set of
/// mailboxes looked up by their own client id: each entry is one pointer
/// (a map with the id as a separate key would cost 16 B more per slot, and
/// idle connections are counted in bytes).
#[derive(Default)]
pub(crate) struct Registry {
    set: HashSet<ByClientId>,
}

/// A mailbox hashed and compared by its client id.
struct ByClientId(Arc<Mailbox>);

impl Borrow<str> for ByClientId {
    fn borrow(&self) -> &str {
        &self.0.client_id
    }
}

impl PartialEq for ByClientId {
    fn eq(&self, other: &Self) -> bool {
        self.0.client_id == other.0.client_id
    }
}

impl Eq for ByClientId {}

impl Hash for ByClientId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must hash as the `str` it borrows as.
        self.0.client_id.as_ref().hash(state);
    }
}

impl Registry {
    pub fn get(&self, client_id: &str) -> Option<&Arc<Mailbox>> {
        self.set.get(client_id).map(|e| &e.0)
    }

    /// The mailbox of `client_id`, created (offline) if there is none; true
    /// when it was created.
    pub fn get_or_create(&mut self, client_id: &str) -> (Arc<Mailbox>, bool) {
        if let Some(e) = self.set.get(client_id) {
            return (e.0.clone(), false);
        }
        let mb = Arc::new(Mailbox::new(client_id.into()));
        self.set.insert(ByClientId(mb.clone()));
        (mb, true)
    }

    /// Removes `mb` if it is still the registered mailbox of its client id.
    pub fn remove_if_same(&mut self, mb: &Arc<Mailbox>) -> bool {
        if self.get(&mb.client_id).is_some_and(|m| Arc::ptr_eq(m, mb)) {
            self.set.remove(&*mb.client_id);
            return true;
        }
        false
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<Mailbox>> {
        self.set.iter().map(|e| &e.0)
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Arc<Message> {
        Arc::new(Message {
            topic: "a".into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: false,
            props: PublishProperties::default(),
            expires_at_ms: 0,
            publisher: 0,
        })
    }

    struct AllowAll;
    impl Authenticator for AllowAll {
        fn authenticate(&self, _: &crate::auth::AuthRequest<'_>) -> crate::auth::AuthDecision {
            crate::auth::AuthDecision::Allow
        }
    }

    fn d() -> Delivery {
        Delivery { msg: msg(), qos: QoS::AtMostOnce, retain: false, sub_ids: Vec::new() }
    }

    #[test]
    fn keepalive_clock_survives_the_32_bit_wrap() {
        let m = Mailbox::new("k".into());
        m.set_keepalive(10); // late after 15 s
        let near_wrap = (1u64 << 32) - 5_000;
        m.touch(near_wrap);
        assert!(!m.keepalive_expired(near_wrap + 14_000), "14 s across the wrap");
        assert!(m.keepalive_expired(near_wrap + 15_001), "15 s + 1 ms across the wrap");
        // A clock reading older than the last packet is no silence.
        assert!(!m.keepalive_expired(near_wrap - 1));
        m.set_keepalive(0);
        assert!(!m.keepalive_expired(near_wrap + 1_000_000_000), "no keep alive: never late");
    }

    #[test]
    fn registry_finds_creates_and_removes_only_its_own_mailbox() {
        let mut reg = Registry::default();
        let (a, created) = reg.get_or_create("a");
        assert!(created);
        let (again, created) = reg.get_or_create("a");
        assert!(!created && Arc::ptr_eq(&a, &again));
        assert!(reg.get("a").is_some_and(|m| Arc::ptr_eq(m, &a)) && reg.get("b").is_none());
        // A mailbox no longer registered under its id is not removed in its place.
        let stale = Arc::new(Mailbox::new("a".into()));
        assert!(!reg.remove_if_same(&stale));
        assert_eq!(reg.len(), 1);
        assert!(reg.remove_if_same(&a));
        assert_eq!((reg.len(), reg.values().count()), (0, 0));
    }

    #[test]
    fn a_copy_routed_for_an_earlier_session_is_refused() {
        let m = Mailbox::new("c".into());
        assert!(m.attach(7).is_ok());
        let routed_for_old = m.session();
        assert_eq!(m.push(d(), routed_for_old, 4, 4, &AllowAll), Push::Queued);
        // The connection ends; another takes the client id with a new session.
        assert!(!m.detach(7));
        assert!(m.attach(8).is_ok());
        m.start_new_session();
        assert_eq!(m.push(d(), routed_for_old, 4, 4, &AllowAll), Push::Offline);
        let mut out = VecDeque::new();
        m.drain(|| &mut out, 10);
        assert!(out.is_empty(), "the new session received a copy routed for the old one");
        assert_eq!(m.push(d(), m.session(), 4, 4, &AllowAll), Push::Queued);
        // Queued before the new session started: emptied with it.
        m.start_new_session();
        m.drain(|| &mut out, 10);
        assert!(out.is_empty());
    }

    #[test]
    fn offline_and_full_mailboxes_drop() {
        let m = Mailbox::new("c".into());
        assert_eq!(m.push(d(), 0, 2, 3, &AllowAll), Push::Offline);
        assert!(m.attach(7).is_ok());
        assert_eq!(m.push(d(), 0, 2, 3, &AllowAll), Push::Queued);
        assert_eq!(m.push(d(), 0, 2, 3, &AllowAll), Push::Queued);
        assert_eq!(m.push(d(), 0, 2, 3, &AllowAll), Push::Full);
        let mut q1 = d();
        q1.qos = QoS::AtLeastOnce;
        assert_eq!(m.push(q1, 0, 2, 3, &AllowAll), Push::Queued);
        let mut out = VecDeque::new();
        m.drain(|| &mut out, 10);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn takeover_waits_for_detach() {
        let m = Mailbox::new("c".into());
        assert!(m.attach(1).is_ok());
        let mut rx = match m.attach(2) {
            Err(rx) => rx,
            Ok(()) => panic!("second attach must wait"),
        };
        assert!(rx.try_recv().is_err());
        assert!(m.detach(1));
        assert!(rx.try_recv().is_ok());
        assert!(m.attach(2).is_ok());
        assert_eq!(m.attached(), 2);
        // A stale detach of the old connection does nothing.
        assert!(!m.detach(1));
        assert_eq!(m.attached(), 2);
    }

    #[test]
    fn expiry_rounds_up_and_detects_expired() {
        let mut m = Message {
            topic: "a".into(),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            props: PublishProperties::default(),
            expires_at_ms: 10_500,
            publisher: 0,
        };
        assert_eq!(m.remaining_expiry(10_000), Ok(Some(1)));
        assert_eq!(m.remaining_expiry(8_000), Ok(Some(3)));
        assert_eq!(m.remaining_expiry(10_500), Err(()));
        m.expires_at_ms = 0;
        assert_eq!(m.remaining_expiry(u64::MAX), Ok(None));
    }
}
