//! The broker core: sessions and routing.
//!
//! Owns everything between a byte stream and the replicated State: the
//! per-connection tasks (connection.rs), the router of all subscriptions
//! (router.rs), the session mailboxes (session.rs), the command pipeline into
//! State (pipeline.rs), `$SYS` (sys.rs) and the counters (metrics.rs).
//! It must not touch sockets' transport details (listener), credentials
//! storage (auth) or the internals of State: every replicated change is a
//! `state::pb::Command` proposed through the pipeline.
//!
//! Documented choices:
//! - A session is *managed* (lives in State) when it is persistent (3.1.1
//!   clean session 0, MQTT 5 session expiry > 0) or resumes a stored session;
//!   other sessions never touch the pipeline unless they publish a retained
//!   message or reach a persistent subscriber.
//! - A non-persistent session ends with its connection, so its will is
//!   published at once whatever its Will Delay Interval (MQTT 5 3.1.3.2.2:
//!   delay or session end, whichever comes first). Managed sessions' wills and
//!   delays are State's (SessionClose `publish_will`, Tick).
//! - Slow consumers: a connection's fast-path outbox holds `outbox_capacity`
//!   messages (QoS 1/2 copies may use `max_queued_messages` more); beyond, the
//!   copy is dropped for that client and counted. Publishers never wait.
//! - The server does not use topic aliases towards clients (allowed by MQTT 5).
//! - Retained messages for a persistent session's new subscription are
//!   delivered through State (`Subscribe.queue_retained`), so its packet ids
//!   all come from State; `$SYS` values are kept here and sent as retained.
//! - Authorization: `can_publish`, `can_subscribe`, `can_unsubscribe` and
//!   `can_receive` (fast-path deliveries in the mailbox, State's deliveries
//!   when the connection sends them). The publish and receive answers are
//!   remembered per connection / mailbox for the last topic while the
//!   authenticator's `decision_epoch` is unchanged (`auth::LastDecision`).

mod connection;
pub mod metrics;
pub mod pipeline;
mod router;
pub mod serving;
mod session;
mod sys;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::auth::Authenticator;
use crate::protocol::{PublishProperties, QoS, RetainHandling, SubscriptionOptions};
use crate::state::{pb, Event, Limits, State};

pub use metrics::Metrics;
pub use pipeline::{Pipeline, PipelineError};
pub use serving::EventRelay;

use router::{Router, SubValue, Target};
use session::{flag, Delivery, Mailbox, Message, Push, Registry};

/// Where a broker sends dynamic-security control requests when its own
/// State does not hold dynamic security: the local broker of dynsec-sync
/// hands them to the cluster group (src/modes.rs).
pub trait ControlApi: Send + Sync + 'static {
    /// Dynamic security is initialised in the cluster.
    fn initialised(&self) -> bool;
    /// Applies a request prepared by `dynsec::prepare_request`; resolves to
    /// the response document.
    fn submit(
        &self,
        prepared: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>>;
}

/// The `[mqtt]` section of the configuration (see config/ and the README).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct BrokerConfig {
    /// Further CONNECTs are refused (CONNACK 0x97 / 3.1.1 return code 3).
    pub max_connections: usize,
    /// Bytes, both directions; announced in CONNACK.
    pub max_packet_size: u32,
    /// Server Receive Maximum: incoming QoS 1/2 in flight per client.
    pub receive_maximum: u16,
    /// Outgoing QoS 1/2 in flight per session (further capped by the client's Receive Maximum).
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    /// 0 = unlimited.
    pub max_queued_bytes: usize,
    pub queue_qos0_offline: bool,
    /// A client asking for more gets Server Keep Alive (MQTT 5).
    pub max_keep_alive: u16,
    pub topic_alias_maximum: u16,
    pub retain_available: bool,
    /// Seconds.
    pub max_session_expiry: u32,
    /// Used by `auth::from_config` (the broker receives the built authenticator).
    pub allow_anonymous: bool,
    pub password_file: Option<PathBuf>,
    /// Seconds between `$SYS` updates; 0 = off.
    pub sys_interval: u64,
    /// Per-connection fast-path queue; when full, messages for that client are dropped.
    pub outbox_capacity: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_connections: 100_000,
            max_packet_size: 1_048_576,
            receive_maximum: 100,
            max_inflight: 100,
            max_queued_messages: 1000,
            max_queued_bytes: 0,
            queue_qos0_offline: false,
            max_keep_alive: 65535,
            topic_alias_maximum: 10,
            retain_available: true,
            max_session_expiry: u32::MAX,
            allow_anonymous: true,
            password_file: None,
            sys_interval: 10,
            outbox_capacity: 1000,
        }
    }
}

impl BrokerConfig {
    /// The limits State enforces for persistent sessions.
    pub fn state_limits(&self) -> Limits {
        Limits {
            max_queued_messages: self.max_queued_messages,
            max_queued_bytes: self.max_queued_bytes,
            max_inflight: self.max_inflight.max(1),
            queue_qos0_offline: self.queue_qos0_offline,
        }
    }
}

/// How long a new connection may take to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a takeover waits for the old connection to finish.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Housekeeping period (coarse clock, keep-alive sweep granularity).
const HOUSEKEEPING: Duration = Duration::from_millis(100);

/// Messages to the subscriber-ack batching task.
pub(crate) enum AckMsg {
    Entries(Vec<pb::AckEntry>),
    /// Answered once every entry sent before it has been applied.
    Flush(oneshot::Sender<()>),
}

pub(crate) struct Inner {
    pub config: BrokerConfig,
    pub auth: Arc<dyn Authenticator>,
    pub metrics: Arc<Metrics>,
    pub router: RwLock<Router>,
    /// Client id -> session handle, online or (persistent) offline.
    pub registry: Mutex<Registry>,
    pub state: Arc<RwLock<State>>,
    pub pipeline: Pipeline,
    pub acks: mpsc::Sender<AckMsg>,
    pub next_conn: AtomicU64,
    pub start: Instant,
    /// Milliseconds since `start`, updated by the housekeeping task.
    pub coarse_ms: AtomicU64,
    pub shutting_down: AtomicBool,
    /// Latest `$SYS` messages, delivered as retained to new `$SYS` subscribers.
    pub sys_retained: Mutex<Vec<Arc<Message>>>,
    /// Whether CONNECTs are accepted now (serving.rs).
    pub serving: serving::Serving,
    /// Where control requests go instead of this broker's State (see [`ControlApi`]).
    pub control: std::sync::OnceLock<Arc<dyn ControlApi>>,
}

/// The broker (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl Broker {
    /// Creates the broker and starts its pipeline, housekeeping (Tick, keep
    /// alive) and `$SYS` tasks on the current runtime.
    pub fn new(config: BrokerConfig, auth: Arc<dyn Authenticator>) -> Broker {
        let state = Arc::new(RwLock::new(State::new(config.state_limits())));
        Self::with_state(config, auth, state)
    }

    /// Like [`Broker::new`] over an existing State (restored from a snapshot).
    pub fn with_state(
        config: BrokerConfig,
        auth: Arc<dyn Authenticator>,
        state: Arc<RwLock<State>>,
    ) -> Broker {
        Self::build(config, auth, state, None)
    }

    /// The broker of a node: commands go through `raft` (which applies them to
    /// `state` and hands the events to `relay`); MQTT is served only while
    /// this node is the serving leader (serving.rs).
    pub fn with_raft(
        config: BrokerConfig,
        auth: Arc<dyn Authenticator>,
        state: Arc<RwLock<State>>,
        raft: crate::raft::RaftNode,
        relay: &EventRelay,
        commit_timeout: Duration,
    ) -> Broker {
        let (_, gate) = tokio::sync::watch::channel(true);
        Self::with_raft_gated(config, auth, state, raft, relay, commit_timeout, gate)
    }

    /// [`Broker::with_raft`] that also serves only while `gate` is true: the
    /// node's mode decides which of its brokers takes clients (src/modes.rs).
    pub fn with_raft_gated(
        config: BrokerConfig,
        auth: Arc<dyn Authenticator>,
        state: Arc<RwLock<State>>,
        raft: crate::raft::RaftNode,
        relay: &EventRelay,
        commit_timeout: Duration,
        gate: tokio::sync::watch::Receiver<bool>,
    ) -> Broker {
        Self::build(config, auth, state, Some((raft, relay, commit_timeout, gate)))
    }

    /// Disconnects the clients a dynamic-security change names (DISCONNECT
    /// 0x98, no will): for a broker whose own State does not apply dynamic
    /// security (the local broker of dynsec-sync).
    pub fn kick(&self, kicks: &crate::dynsec::Kicks) {
        self.inner.kick(kicks);
    }

    /// Sends this broker's dynamic-security control requests to `api`
    /// instead of its own State (set once, before it serves).
    pub fn set_control(&self, api: Arc<dyn ControlApi>) {
        if self.inner.control.set(api).is_err() {
            tracing::warn!("control API set twice; keeping the first");
        }
    }

    fn build(
        config: BrokerConfig,
        auth: Arc<dyn Authenticator>,
        state: Arc<RwLock<State>>,
        raft: Option<(crate::raft::RaftNode, &EventRelay, Duration, tokio::sync::watch::Receiver<bool>)>,
    ) -> Broker {
        let metrics = Arc::new(Metrics::default());
        let (ack_tx, ack_rx) = mpsc::channel(1024);
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| {
            let w = weak.clone();
            let sink: pipeline::EventSink = Box::new(move |events| {
                if let Some(inner) = w.upgrade() {
                    inner.on_events(events);
                }
            });
            let pipeline = match &raft {
                None => Pipeline::start(state.clone(), sink, metrics.clone()),
                Some((node, relay, timeout, _)) => {
                    relay.bind(weak.clone());
                    Pipeline::start_raft(node.clone(), metrics.clone(), *timeout)
                }
            };
            let serving = if raft.is_some() { serving::Serving::off() } else { serving::Serving::always() };
            Inner {
                config,
                auth,
                metrics,
                router: RwLock::new(Router::default()),
                registry: Mutex::new(Registry::default()),
                state,
                pipeline,
                acks: ack_tx,
                next_conn: AtomicU64::new(1),
                start: Instant::now(),
                coarse_ms: AtomicU64::new(0),
                shutting_down: AtomicBool::new(false),
                sys_retained: Mutex::new(Vec::new()),
                serving,
                control: std::sync::OnceLock::new(),
            }
        });
        if let Some((node, _, _, gate)) = raft {
            // Sessions are restored when this node starts serving.
            tokio::spawn(serving::run(Arc::downgrade(&inner), node, gate));
        } else if inner.restore_sessions() {
            // The State came from a snapshot: connections it marks online are
            // gone; end them as abnormal disconnects before anyone connects
            // (first in the pipeline's FIFO).
            let reset = pb::ResetConnections { publish_wills: true };
            let cmd = pb::Command { cmd: Some(pb::command::Cmd::ResetConnections(reset)) };
            if inner.pipeline.try_submit(cmd).is_err() {
                tracing::warn!("could not queue ResetConnections");
            }
        }
        tokio::spawn(ack_task(Arc::downgrade(&inner), ack_rx));
        tokio::spawn(housekeeping(Arc::downgrade(&inner)));
        if inner.config.sys_interval > 0 {
            tokio::spawn(sys::run(Arc::downgrade(&inner)));
        }
        Broker { inner }
    }

    /// The CONNECT phase of a client connection: resolves to the future that
    /// serves the accepted client until it closes, or to `None` when the
    /// connection ended before that. `stream` is any byte stream (TCP, TLS,
    /// WebSocket). The listener runs the two in one task (the first boxed).
    pub fn connect_client<S>(
        &self,
        stream: S,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = Option<impl std::future::Future<Output = ()> + Send + 'static>>
           + Send
           + 'static
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        connection::connect(self.inner.clone(), stream, peer)
    }

    /// Serves one client connection until it ends: [`Self::connect_client`]
    /// and then what it yields, as one future.
    /// (A plain `fn` returning the future, so the future stays a few pointers
    /// big; call it as `broker.serve_connection(s, peer).await`.)
    pub fn serve_connection<S>(
        &self,
        stream: S,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send + 'static
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        connection::serve(self.inner.clone(), stream, peer)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// The replicated state (read access for admin views and backups).
    pub fn state(&self) -> &Arc<RwLock<State>> {
        &self.inner.state
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.inner.pipeline
    }

    /// Whether this broker accepts MQTT clients now (the serving leader).
    pub fn is_serving(&self) -> bool {
        self.inner.serving.is_on()
    }

    /// Waits until the broker serves, at most `timeout`; returns whether it does.
    pub async fn wait_serving(&self, timeout: Duration) -> bool {
        self.inner.serving.wait_on(timeout).await
    }

    /// Tells every connection to close (MQTT 5: DISCONNECT 0x8B) and waits
    /// (at most 5 s) until they have closed and their session changes are applied.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let mailboxes: Vec<Arc<Mailbox>> = self.inner.registry.lock().values().cloned().collect();
        for m in &mailboxes {
            m.signal(flag::SHUTDOWN);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Metrics::get(&self.inner.metrics.connections_open) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            // Connections that were still in CONNECT when the flag was set.
            for m in self.inner.registry.lock().values() {
                m.signal(flag::SHUTDOWN);
            }
        }
        // Everything proposed so far is applied once this no-op batch answers.
        let _ =
            self.inner.pipeline.propose(pb::Command { cmd: Some(pb::command::Cmd::Tick(pb::Tick {})) }).await;
    }
}

impl Inner {
    pub fn now_coarse(&self) -> u64 {
        self.coarse_ms.load(Ordering::Relaxed)
    }

    /// Hands fast-path copies to their mailboxes; slow or offline clients lose them (counted).
    pub fn deliver(&self, msg: &Arc<Message>, targets: Vec<Target>, force_retain: bool) {
        let cap = self.config.outbox_capacity.max(1);
        let cap12 = cap.saturating_add(self.config.max_queued_messages);
        for t in targets {
            let d = Delivery {
                msg: msg.clone(),
                qos: t.qos,
                retain: force_retain || (t.retain_as_published && msg.retain),
                sub_ids: t.sub_ids,
            };
            match t.mailbox.push(d, t.session, cap, cap12, &*self.auth) {
                Push::Queued | Push::Offline | Push::Denied => {}
                Push::Full => Metrics::inc(&self.metrics.messages_dropped_outbox),
            }
        }
    }

    /// Publishes a message that comes from the broker itself (a will of a
    /// non-persistent session, `$SYS`): fast path now, State in the background.
    pub fn publish_internal(self: &Arc<Self>, msg: Message, force_retain: bool, store: bool) {
        let msg = Arc::new(msg);
        let route = self.router.read().route(&msg, self.config.queue_qos0_offline);
        if store && (route.needs_state || (msg.retain && self.config.retain_available)) {
            let cmd = publish_command(&msg, "", route.shared_targets, None);
            let inner = self.clone();
            tokio::spawn(async move {
                let _ = inner.pipeline.send(cmd).await;
            });
        }
        self.deliver(&msg, route.targets, force_retain);
    }

    /// Disconnects the clients a dynamic-security change names (Mosquitto's
    /// "kick": DISCONNECT 0x98, no will).
    fn kick(&self, kicks: &crate::dynsec::Kicks) {
        let mailboxes: Vec<Arc<Mailbox>> = self.registry.lock().values().cloned().collect();
        for mb in mailboxes {
            if mb.attached() == 0 {
                continue;
            }
            let hit = kicks.usernames.iter().any(|u| mb.username_is(Some(u)))
                || (kicks.anonymous && mb.username_is(None));
            if hit {
                mb.signal(flag::KICK);
            }
        }
    }

    fn on_events(self: &Arc<Self>, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::Deliver { client_id } => {
                    let mb = self.registry.lock().get(client_id.as_str()).cloned();
                    if let Some(mb) = mb {
                        mb.signal(flag::STATE);
                    }
                }
                Event::Published { message } => {
                    // State already delivered it to persistent sessions; the fast
                    // path covers the others.
                    let msg = Arc::new(message_from_pb(&message, 0));
                    let route = self.router.read().route(&msg, false);
                    self.deliver(&msg, route.targets, false);
                }
                Event::DynsecKick { kicks } => self.kick(&kicks),
                Event::SessionEnded { client_id } => {
                    let mut reg = self.registry.lock();
                    let ended = match reg.get(client_id.as_str()) {
                        Some(mb) if mb.attached() == 0 => Some(mb.clone()),
                        _ => None,
                    };
                    if let Some(mb) = ended {
                        reg.remove_if_same(&mb);
                        // Still under the registry lock: a new connection with this
                        // id (a new mailbox) cannot subscribe before the ended
                        // session's filters, keyed by client id, are gone.
                        self.drop_subscriptions(&mb);
                        drop(reg);
                        Metrics::dec(&self.metrics.sessions_persistent);
                    }
                }
                Event::SessionsRestored { client_ids } => {
                    // Only the serving leader keeps a fast path; another node
                    // rebuilds it from State when it starts serving.
                    if self.serving.is_on() {
                        self.register_sessions(Some(&client_ids));
                    }
                }
            }
        }
    }

    /// Makes the router and the registry match the sessions State holds (a
    /// State restored from a snapshot, or a new leader): offline mailboxes
    /// with every stored subscription.
    /// Returns true when State held sessions.
    fn restore_sessions(&self) -> bool {
        self.register_sessions(None)
    }

    /// [`Self::restore_sessions`] for the given sessions only (None: all);
    /// idempotent for sessions already registered (a restore in merge mode).
    fn register_sessions(&self, only: Option<&[String]>) -> bool {
        let st = self.state.read();
        let mut reg = self.registry.lock();
        let mut router = self.router.write();
        let picked: Vec<(&str, &crate::state::Session)> = match only {
            None => st.sessions().collect(),
            Some(ids) => ids.iter().filter_map(|id| st.session(id).map(|s| (id.as_str(), s))).collect(),
        };
        for (client_id, sess) in picked {
            let (mb, fresh) = reg.get_or_create(client_id);
            let key = mb.client_id.clone();
            mb.set_managed(true);
            if fresh || only.is_none() {
                Metrics::inc(&self.metrics.sessions_persistent);
            }
            for sub in sess.subscriptions() {
                let opts = SubscriptionOptions {
                    qos: QoS::from_u8(sub.qos.min(2) as u8).unwrap_or_default(),
                    no_local: sub.no_local,
                    retain_as_published: sub.retain_as_published,
                    retain_handling: match sub.retain_handling {
                        1 => RetainHandling::SendIfNew,
                        2 => RetainHandling::DoNotSend,
                        _ => RetainHandling::SendAtSubscribe,
                    },
                };
                let value = SubValue {
                    opts,
                    sub_id: (sub.subscription_id != 0).then_some(sub.subscription_id),
                    mailbox: mb.clone(),
                };
                if !router.subscribe(&key, &sub.filter, value) {
                    Metrics::inc(&self.metrics.subscriptions);
                }
                mb.add_filter(&sub.filter);
            }
        }
        st.session_count() > 0
    }

    /// Removes every router entry of a session.
    pub fn drop_subscriptions(&self, mb: &Arc<Mailbox>) {
        let filters = mb.take_filters();
        if filters.is_empty() {
            return;
        }
        let mut r = self.router.write();
        for f in &filters {
            if r.unsubscribe_for(mb, f) {
                Metrics::dec(&self.metrics.subscriptions);
            }
        }
    }
}

/// The State command for publishing `msg`.
pub(crate) fn publish_command(
    msg: &Message,
    publisher: &str,
    shared_targets: Vec<(String, String)>,
    qos2_id: Option<u16>,
) -> pb::Command {
    pb::Command {
        cmd: Some(pb::command::Cmd::Publish(pb::Publish {
            message: Some(message_to_pb(msg)),
            publisher_client_id: publisher.to_owned(),
            shared_targets: shared_targets
                .into_iter()
                .map(|(client_id, filter)| pb::SharedTarget { client_id, filter })
                .collect(),
            incoming_qos2_packet_id: qos2_id.map(u32::from),
        })),
    }
}

pub(crate) fn message_to_pb(m: &Message) -> pb::Message {
    // A retained payload may outlive the read buffer it was split from: copy it
    // so the (larger) buffer is not pinned by State.
    let payload = if m.retain { Bytes::copy_from_slice(&m.payload) } else { m.payload.clone() };
    pb::Message {
        topic: m.topic.clone(),
        payload,
        qos: m.qos as u32,
        retain: m.retain,
        payload_format_indicator: m.props.payload_format_indicator.map(u32::from),
        content_type: m.props.content_type.clone(),
        response_topic: m.props.response_topic.clone(),
        correlation_data: m.props.correlation_data.clone(),
        user_properties: m
            .props
            .user_properties
            .iter()
            .map(|(name, value)| pb::UserProperty { name: name.clone(), value: value.clone() })
            .collect(),
        expires_at_ms: m.expires_at_ms,
    }
}

pub(crate) fn message_from_pb(m: &pb::Message, publisher: usize) -> Message {
    Message {
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        qos: QoS::from_u8(m.qos.min(2) as u8).unwrap_or_default(),
        retain: m.retain,
        props: PublishProperties {
            payload_format_indicator: m.payload_format_indicator.map(|v| v.min(255) as u8),
            message_expiry_interval: None,
            topic_alias: None,
            response_topic: m.response_topic.clone(),
            correlation_data: m.correlation_data.clone(),
            user_properties: m.user_properties.iter().map(|u| (u.name.clone(), u.value.clone())).collect(),
            subscription_identifiers: Vec::new(),
            content_type: m.content_type.clone(),
        },
        expires_at_ms: m.expires_at_ms,
        publisher,
    }
}

/// Batches subscribers' acknowledgements into `Ack` commands.
async fn ack_task(weak: Weak<Inner>, mut rx: mpsc::Receiver<AckMsg>) {
    let mut msgs = Vec::with_capacity(64);
    while rx.recv_many(&mut msgs, 64).await > 0 {
        let Some(inner) = weak.upgrade() else { return };
        let mut acks = Vec::new();
        let mut flushers = Vec::new();
        for m in msgs.drain(..) {
            match m {
                AckMsg::Entries(mut e) => acks.append(&mut e),
                AckMsg::Flush(tx) => flushers.push(tx),
            }
        }
        if !acks.is_empty() {
            let cmd = pb::Command { cmd: Some(pb::command::Cmd::Ack(pb::Ack { acks })) };
            if flushers.is_empty() {
                let _ = inner.pipeline.send(cmd).await;
            } else {
                let _ = inner.pipeline.propose(cmd).await;
            }
        }
        for f in flushers {
            let _ = f.send(());
        }
    }
}

/// Coarse clock, keep-alive sweep and the periodic State `Tick`.
async fn housekeeping(weak: Weak<Inner>) {
    let mut iv = tokio::time::interval(HOUSEKEEPING);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        iv.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        let now = inner.start.elapsed().as_millis() as u64;
        inner.coarse_ms.store(now, Ordering::Relaxed);
        n += 1;
        if n % 5 == 0 {
            // Keep alive: a client silent for 1.5 x its keep alive is closed.
            let late: Vec<Arc<Mailbox>> =
                inner.registry.lock().values().filter(|m| m.keepalive_expired(now)).cloned().collect();
            for m in late {
                m.signal(flag::KEEPALIVE);
            }
        }
        if n % 10 == 0 {
            let p = inner.pipeline.clone();
            drop(inner);
            let _ = p.send(pb::Command { cmd: Some(pb::command::Cmd::Tick(pb::Tick {})) }).await;
        }
    }
}
