//! Leadership transitions of the broker (DESIGN.md "Leadership", full-sync).
//!
//! Owns the broker's "may serve MQTT now" flag and the task that follows the
//! Raft node's metrics to move it:
//! - becoming serving (Raft `serving`: leader, own-term entry applied, quorum
//!   contact): propose `ResetConnections` (sessions State still marks online
//!   belonged to connections of an earlier leader or an earlier run: they go
//!   offline, wills per their rules), rebuild the router and the registry
//!   from State's persistent sessions, then accept CONNECTs;
//! - losing it (leadership or quorum contact): refuse CONNECTs at once, tell
//!   every connection to close (MQTT 5: DISCONNECT 0x9C with the leader as
//!   Server Reference), wait (bounded) for them, then drop the fast-path
//!   state (router, registry): the next leader rebuilds it from State.
//! - a leader transfer this node asked for (SIGTERM hand-over in node.rs,
//!   the pinned leader, the admin API): new CONNECTs are refused at once (a
//!   client accepted now would be moved again a moment later), and stepping
//!   down first waits, bounded, until the new leader is known, so every
//!   client's DISCONNECT 0x9C carries the new leader's address as Server
//!   Reference. If leadership has not moved after [`TRANSFER_WAIT`], the node
//!   serves again.
//!
//! While not serving, the connection code answers CONNECT with CONNACK 0x9C
//! (+ Server Reference, MQTT 5) or 3 "server unavailable" (3.1.1).
//! It must not touch State other than by proposing through the pipeline.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tokio::sync::watch;

use crate::raft::{NodeMetrics, RaftNode};
use crate::state::{pb, Event};

use super::metrics::Metrics;
use super::router::Router;
use super::session::flag;
use super::Inner;

/// Pause before taking over again after a failed ResetConnections.
const RETRY: Duration = Duration::from_millis(200);
/// How long stepping down waits for the connections to close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// In a planned hand-over, how long stepping down waits to learn the new
/// leader's address before it disconnects clients without it.
const HANDOVER_REFERENCE_WAIT: Duration = Duration::from_secs(2);
/// How long a leader that asked for a transfer refuses new clients while
/// waiting for leadership to move; then it serves again.
const TRANSFER_WAIT: Duration = Duration::from_secs(2);

/// The broker's serving flag and the leader's MQTT address.
pub(crate) struct Serving {
    on: watch::Sender<bool>,
    /// MQTT address of the current leader when it is another node (Server Reference).
    leader_ref: RwLock<Option<String>>,
    /// A planned hand-over is under way (see the module docs).
    handover: std::sync::atomic::AtomicBool,
}

impl Serving {
    /// Always serving (the broker's local pipeline, without Raft).
    pub fn always() -> Serving {
        Serving { on: watch::Sender::new(true), leader_ref: RwLock::new(None), handover: false.into() }
    }

    /// Not serving until the serving task says so.
    pub fn off() -> Serving {
        Serving { on: watch::Sender::new(false), leader_ref: RwLock::new(None), handover: false.into() }
    }

    pub fn is_on(&self) -> bool {
        *self.on.borrow()
    }

    /// The leader's MQTT address for a Server Reference, when known.
    pub fn server_reference(&self) -> Option<String> {
        self.leader_ref.read().clone()
    }

    /// Waits until serving, at most `timeout`; returns whether it is.
    pub async fn wait_on(&self, timeout: Duration) -> bool {
        let mut rx = self.on.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|on| *on)).await.is_ok_and(|r| r.is_ok())
    }

    fn set(&self, on: bool) {
        self.on.send_replace(on);
    }

    fn note_leader(&self, m: &NodeMetrics) {
        let r = match (&m.leader, &m.leader_addr) {
            (Some(l), Some(a)) if *l != m.node_id => Some(a.mqtt_addr.clone()),
            _ => None,
        };
        let mut cur = self.leader_ref.write();
        if *cur != r {
            *cur = r;
        }
    }
}

/// Hands the events of the Raft state machine to the broker once it exists
/// (the Raft node starts first; events applied before go nowhere, as on a
/// follower). Cheap to clone.
#[derive(Clone, Default)]
pub struct EventRelay(Arc<OnceLock<Weak<Inner>>>);

impl EventRelay {
    pub fn new() -> EventRelay {
        EventRelay::default()
    }

    /// The sink to give `RaftNode::start`. It runs on the state-machine task:
    /// it only takes the broker's short locks and signals mailboxes.
    pub fn sink(&self) -> crate::raft::EventSink {
        let relay = self.clone();
        Box::new(move |events: Vec<Event>| {
            if let Some(inner) = relay.0.get().and_then(Weak::upgrade) {
                inner.on_events(events);
            }
        })
    }

    pub(crate) fn bind(&self, inner: Weak<Inner>) {
        if self.0.set(inner).is_err() {
            tracing::warn!("event relay bound twice; keeping the first broker");
        }
    }
}

/// Follows the Raft metrics and moves the serving flag (see the module docs).
/// Serves only while `gate` is true as well: the node's mode lets this
/// broker take clients (src/modes.rs).
pub(crate) async fn run(weak: Weak<Inner>, raft: RaftNode, mut gate: watch::Receiver<bool>) {
    let mut rx = raft.subscribe();
    let mut transfers = raft.subscribe_transfers();
    loop {
        // Wait for Raft to say this node may serve.
        loop {
            let serving = {
                let m = rx.borrow_and_update();
                if let Some(inner) = weak.upgrade() {
                    inner.serving.note_leader(&m);
                }
                m.serving
            };
            if serving && *gate.borrow_and_update() {
                break;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                r = gate.changed() => if r.is_err() { return },
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        if inner.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        if !become_serving(&inner).await {
            // Leadership went (or the reset did not commit in time): start
            // again from the metrics, retrying shortly even if they stay the same.
            drop(inner);
            if let Ok(Err(_)) = tokio::time::timeout(RETRY, rx.changed()).await {
                return;
            }
            continue;
        }
        drop(inner);
        transfers.borrow_and_update();
        let mut transfer_until: Option<tokio::time::Instant> = None;
        // Serve until Raft says otherwise.
        loop {
            let give_up = async {
                match transfer_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                r = gate.changed() => {
                    if r.is_err() {
                        return;
                    }
                    if !*gate.borrow_and_update() {
                        tracing::info!("stopped serving MQTT here: the cluster mode changed");
                        break;
                    }
                    continue;
                }
                r = transfers.changed() => {
                    if r.is_err() {
                        return;
                    }
                    transfers.borrow_and_update();
                    if let Some(inner) = weak.upgrade() {
                        tracing::info!("leader transfer requested: refusing new clients until leadership moves");
                        inner.serving.handover.store(true, Ordering::SeqCst);
                        inner.serving.set(false);
                    }
                    transfer_until = Some(tokio::time::Instant::now() + TRANSFER_WAIT);
                    continue;
                }
                _ = give_up => {
                    transfer_until = None;
                    if let Some(inner) = weak.upgrade() {
                        if rx.borrow().serving && !inner.shutting_down.load(Ordering::Relaxed) {
                            tracing::warn!("leadership did not move after the transfer request; serving again");
                            inner.serving.handover.store(false, Ordering::SeqCst);
                            inner.serving.set(true);
                        }
                    }
                    continue;
                }
            }
            let m = rx.borrow_and_update().clone();
            if let Some(inner) = weak.upgrade() {
                inner.serving.note_leader(&m);
            }
            if !m.serving {
                tracing::info!(leader = ?m.leader, role = ?m.role, "stopped serving MQTT: not the leader or no quorum contact");
                break;
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        if inner.serving.handover.load(Ordering::SeqCst) {
            inner.serving.set(false);
            wait_for_new_leader(&inner, &mut rx).await;
        }
        step_down(&inner).await;
    }
}

/// Planned hand-over: the old leader learns the new one a moment after it
/// stepped down (once the winner's first AppendEntries arrives); wait for
/// that, bounded, so the clients are told where to go.
async fn wait_for_new_leader(inner: &Inner, rx: &mut watch::Receiver<crate::raft::NodeMetrics>) {
    let wait = async {
        loop {
            {
                let m = rx.borrow_and_update();
                inner.serving.note_leader(&m);
                if inner.serving.server_reference().is_some() {
                    return;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    };
    if tokio::time::timeout(HANDOVER_REFERENCE_WAIT, wait).await.is_err() {
        tracing::warn!(
            "new leader not known after the hand-over; disconnecting clients without a Server Reference"
        );
    }
}

impl super::Broker {
    /// Waits until this node no longer serves and its MQTT clients are gone
    /// (they were told to use another server), at most `timeout`; returns
    /// whether that happened.
    pub async fn wait_stepped_down(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_serving() && Metrics::get(&self.inner.metrics.clients_connected) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// ResetConnections, rebuild, serve. False when the reset did not commit.
async fn become_serving(inner: &Arc<Inner>) -> bool {
    let reset = pb::ResetConnections { publish_wills: true };
    let cmd = pb::Command { cmd: Some(pb::command::Cmd::ResetConnections(reset)) };
    if let Err(e) = inner.pipeline.propose(cmd).await {
        tracing::warn!(error = %e, "could not take over the sessions (ResetConnections)");
        return false;
    }
    // 100k sessions take a while to register: on a blocking thread, so the
    // async workers keep running the Raft core (heartbeats) meanwhile.
    let i = inner.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || rebuild(&i)).await {
        tracing::warn!(error = %e, "could not rebuild the sessions");
        return false;
    }
    inner.serving.handover.store(false, Ordering::SeqCst);
    inner.serving.set(true);
    tracing::info!(
        sessions = Metrics::get(&inner.metrics.sessions_persistent),
        "serving MQTT (leader, sessions restored)"
    );
    true
}

/// The router and registry from State's persistent sessions, from scratch.
fn rebuild(inner: &Inner) {
    drop_fast_path(inner);
    inner.restore_sessions();
}

fn drop_fast_path(inner: &Inner) {
    let old_registry = std::mem::take(&mut *inner.registry.lock());
    *inner.router.write() = Router::default();
    inner.metrics.sessions_persistent.store(0, Ordering::Relaxed);
    inner.metrics.subscriptions.store(0, Ordering::Relaxed);
    drop(old_registry);
}

/// Refuse, disconnect everyone, wait for them (bounded), drop the fast path.
async fn step_down(inner: &Arc<Inner>) {
    inner.serving.set(false);
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let mailboxes: Vec<_> = inner.registry.lock().values().cloned().collect();
        for m in &mailboxes {
            m.signal(flag::NOT_SERVING);
        }
        if Metrics::get(&inner.metrics.clients_connected) == 0 || Instant::now() >= deadline {
            break;
        }
        // Connections close on their own tasks; look again shortly (also
        // catches one that attached while CONNECT was in progress).
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = Metrics::get(&inner.metrics.clients_connected);
    if left > 0 {
        tracing::warn!(left, "connections still open after stepping down");
    }
    drop_fast_path(inner);
}
