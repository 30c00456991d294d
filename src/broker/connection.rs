//! One client connection: CONNECT handshake, then a single task that reads,
//! writes, drains the session's mailbox and follows its pending State
//! proposals, until the connection ends.
//!
//! Owns the per-connection protocol state: topic aliases, incoming QoS 2 ids,
//! the fast-path in-flight window, the FIFO of acknowledgements waiting for
//! State, and which of State's in-flight messages were sent on this connection.
//! It changes replicated state only through the pipeline, and never touches
//! another connection except through its mailbox.
//!
//! Memory: an idle connection keeps no read or write buffer (reads go through
//! a per-thread scratch buffer; the connection keeps bytes only for a partial
//! packet), and all its state sits in one struct inside the connection's task
//! (the CONNECT and closing phases are boxed, freed when they end).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::auth::{AuthDecision, AuthRequest, LastDecision};
use crate::dynsec;
use crate::protocol::{
    self, reason, ConnAck, ConnAckProperties, Connect, Disconnect, LastWill, Packet, ProtocolVersion,
    PubResp, Publish, PublishProperties, QoS, RetainHandling, SubAck, Subscribe, SubscriptionOptions,
    UnsubAck, Unsubscribe,
};
use crate::state::{pb, Applied};
use crate::topic;

use super::metrics::Metrics;
use super::pipeline::{now_ms, Reply, TrySubmitError};
use super::router::{split_shared, SubValue, Target};
use super::session::{flag, Delivery, Mailbox, Message};
use super::{message_from_pb, publish_command, AckMsg, Inner, CONNECT_TIMEOUT, TAKEOVER_TIMEOUT};

/// Bytes read per system call at most (the per-thread scratch buffer).
const READ_CHUNK: usize = 16 * 1024;
/// Above this many unwritten bytes the connection stops reading and stops
/// draining its mailbox (the mailbox then drops for this client only).
const WRITE_HIGH: usize = 256 * 1024;
/// Deliveries taken from the mailbox per wake-up.
const DRAIN: usize = 256;
/// How long a connection the server closed keeps reading (and discarding)
/// what the client still sends, at most (see `Conn::linger`).
const LINGER: Duration = Duration::from_secs(2);

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; READ_CHUNK]);
}

/// The byte stream plus the partial input and unwritten output.
struct Io<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    /// Reads what is available into `rbuf`; Ok(0) = end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let mut rb = ReadBuf::new(&mut s[..]);
            match Pin::new(&mut self.stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    self.rbuf.extend_from_slice(rb.filled());
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    }

    /// Writes `wbuf` out; Ready(Ok) once all is written and flushed.
    fn poll_write_out(&mut self, cx: &mut Context<'_>, metrics: &Metrics) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    Metrics::add(&metrics.bytes_sent, n as u64);
                    self.wbuf.advance(n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Idle connections keep no write buffer.
        self.wbuf = BytesMut::new();
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    async fn write_out(&mut self, metrics: &Metrics) -> io::Result<()> {
        poll_fn(|cx| self.poll_write_out(cx, metrics)).await
    }

    fn send(&mut self, p: &Packet, version: ProtocolVersion, metrics: &Metrics) {
        if protocol::encode(p, version, &mut self.wbuf).is_ok() {
            Metrics::inc(&metrics.messages_sent);
        }
    }
}

/// Why the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// The client sent DISCONNECT; `will` unless its reason code was 0x00.
    Client { will: bool },
    /// End of stream or socket error without DISCONNECT.
    Lost,
    /// The server closes (MQTT 5: DISCONNECT with this reason).
    Server { reason: u8, text: &'static str },
}

impl Close {
    fn server(reason: u8, text: &'static str) -> Close {
        Close::Server { reason, text }
    }
}

type Step = Result<(), Close>;

/// The CONNECT phase of a new connection (see the module docs): resolves, once the client is
/// accepted (CONNACK sent), to the future that serves it until it closes, or
/// to `None` when the connection ended before that. The listener runs this
/// phase in a box freed when serving starts, and the serving future in the
/// connection's task itself: an idle connection keeps only its [`Conn`] and
/// the main loop's few words (counted in bytes).
pub(crate) async fn connect<S>(
    inner: Arc<Inner>,
    stream: S,
    peer: SocketAddr,
) -> Option<impl Future<Output = ()> + Send + 'static>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Metrics::inc(&inner.metrics.connections_open);
    Metrics::inc(&inner.metrics.connections_total);
    let io = Io { stream, rbuf: BytesMut::new(), wbuf: BytesMut::new() };
    // Both phases count the connection out of `connections_open` when they end it.
    let conn = connect_phase(inner, io, peer).await?;
    Some(conn.run())
}

/// Both phases of a connection as one future (the CONNECT phase boxed), for
/// callers without a listener.
pub(crate) fn serve<S>(
    inner: Arc<Inner>,
    stream: S,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connect = Box::pin(connect(inner, stream, peer));
    async move {
        // `let else`, not `if let`: the scrutinee of an `if let` would keep a
        // second copy of the connection's state in the future.
        let Some(run) = connect.await else { return };
        run.await;
    }
}

async fn connect_phase<S>(inner: Arc<Inner>, mut io: Io<S>, peer: SocketAddr) -> Option<Conn<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let accepted = match tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&inner, &mut io)).await {
        Ok(Some(connect)) => Box::pin(accept(inner.clone(), io, connect, peer)).await,
        _ => None,
    };
    if accepted.is_none() {
        Metrics::dec(&inner.metrics.connections_open);
    }
    accepted
}

/// Reads the first packet, which must be CONNECT. Answers a CONNECT that
/// cannot be decoded with the CONNACK its error calls for.
async fn read_connect<S: AsyncRead + AsyncWrite + Unpin>(inner: &Inner, io: &mut Io<S>) -> Option<Connect> {
    let max = inner.config.max_packet_size as usize;
    loop {
        match protocol::decode(&mut io.rbuf, None, max) {
            Ok(Some(Packet::Connect(c))) => {
                Metrics::inc(&inner.metrics.messages_received);
                return Some(c);
            }
            Ok(Some(_)) => return None,
            Ok(None) => {}
            Err(e) => {
                let code = e.reason_code();
                tracing::debug!(error = %e, "bad CONNECT");
                if let Some(v) = e.connack_version() {
                    // 3.1.1 answers only an unacceptable protocol level / identifier;
                    // other broken CONNECTs are just closed.
                    if v.is_v5()
                        || code == reason::UNSUPPORTED_PROTOCOL_VERSION
                        || code == reason::CLIENT_IDENTIFIER_NOT_VALID
                    {
                        Box::pin(refuse(inner, io, v, code)).await;
                    }
                }
                return None;
            }
        }
        match poll_fn(|cx| io.poll_fill(cx)).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => Metrics::add(&inner.metrics.bytes_received, n as u64),
        }
    }
}

/// Outgoing QoS 1/2 message of the fast path waiting for its acknowledgement.
struct OutFlight {
    qos: QoS,
    /// PUBREC received, PUBREL sent.
    released: bool,
}

/// A State in-flight entry as sent on this connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// PUBLISH sent; `msg` identifies the State message (entries may reuse ids).
    Publish { msg: usize },
    /// PUBREL sent.
    Released { msg: usize },
    /// The client acknowledged it; the batched Ack is on its way to State.
    Done { msg: usize },
}

impl Sent {
    fn msg(self) -> usize {
        match self {
            Sent::Publish { msg } | Sent::Released { msg } | Sent::Done { msg } => msg,
        }
    }
}

/// Retained messages to send after a SUBACK.
struct RetainReq {
    filter: String,
    opts: SubscriptionOptions,
    sub_id: Option<u32>,
    /// Index of the filter in the State Subscribe command (managed sessions).
    state_idx: Option<usize>,
    existed: bool,
}

/// What to do once a pending proposal (if any) is applied, in FIFO order.
enum Action {
    Publish {
        msg: Arc<Message>,
        targets: Vec<Target>,
        ack: Option<Packet>,
    },
    /// A plain acknowledgement (PUBREC for a duplicate, PUBCOMP after Release).
    Ack {
        packet: Packet,
        releases_quota: bool,
    },
    SubAck {
        ack: SubAck,
        retained: Vec<RetainReq>,
    },
    UnsubAck(UnsubAck),
    /// A PUBLISH on `$CONTROL/...`: publish the dynamic-security response
    /// (given, or from the applied DynsecControl), then acknowledge.
    Control {
        ack: Option<Packet>,
        response: Option<Vec<u8>>,
    },
    /// Nothing to do once applied.
    Nothing,
}

enum Stage {
    /// The pipeline queue was full: not yet proposed (later ones wait behind it).
    Unsent(Box<pb::Command>),
    Waiting(oneshot::Receiver<Reply>),
    /// Applied (or nothing to apply: `None`).
    Done(Option<Result<Reply, oneshot::error::RecvError>>),
}

struct Pending {
    stage: Stage,
    action: Action,
}

#[derive(Clone, Copy)]
enum EvKind {
    Read,
    Other,
}

enum Ev {
    Read,
    Mailbox(u8),
    Applied,
    Closed(Close),
}

/// The state of an accepted connection; it lives in the connection's task,
/// so keep it small.
struct Conn<S> {
    inner: Arc<Inner>,
    io: Io<S>,
    version: ProtocolVersion,
    conn_id: u64,
    /// The session's handle; its `client_id` is the connection's.
    mailbox: Arc<Mailbox>,
    /// The session lives in State (persistent, or resumed from State).
    managed: bool,
    /// Session Expiry Interval in force (seconds).
    session_expiry: u32,
    client_receive_max: u16,
    client_max_packet: u32,
    topic_alias_max: u16,
    /// Incoming QoS > 0 PUBLISH not yet fully acknowledged (Receive Maximum).
    in_unacked: u16,
    next_pid: u16,
    /// The first scan after resuming a session sends with DUP.
    resume_dup: bool,
    /// State in-flight entries were held back by the client's Receive Maximum.
    state_deferred: bool,
    /// The message flow's queues, allocated on first traffic and given back
    /// when a PINGREQ finds them empty: an idle connection keeps none.
    flow: Option<Box<Flow>>,
    /// Rarely used state, allocated on first use (idle connections stay small).
    cold: Option<Box<Cold>>,
}

/// The queues of a connection's message flow.
#[derive(Default)]
struct Flow {
    /// Proposals and actions in per-client order (see `Pending`).
    pending: VecDeque<Pending>,
    /// Entries of `pending` in stage `Unsent`.
    unsent: u32,
    /// Fast-path deliveries taken from the mailbox, waiting for window room.
    held: VecDeque<Delivery>,
    /// Fast-path QoS 1/2 publishes sent and not yet acknowledged, by packet id.
    out_inflight: BTreeMap<u16, OutFlight>,
    /// Subscriber acks of State in-flight entries, for the batching task.
    acks: Vec<pb::AckEntry>,
}

impl Flow {
    /// Nothing queued in any direction (`unsent` counts entries of `pending`).
    fn is_empty(&self) -> bool {
        self.pending.is_empty()
            && self.held.is_empty()
            && self.out_inflight.is_empty()
            && self.acks.is_empty()
    }
}

#[derive(Default)]
struct Cold {
    /// Shared with the mailbox (`Mailbox::set_username`): one allocation.
    username: Option<Arc<str>>,
    /// The last publishClientSend / publishClientReceive answers (a client
    /// usually repeats its topics): reused while the rules are unchanged.
    may_publish: LastDecision,
    may_receive: LastDecision,
    /// The rest, boxed again: an authenticated idle connection (user name and
    /// remembered answers only) keeps 48 bytes here instead of ~300.
    rare: Option<Box<Rare>>,
}

/// Protocol state few connections need, allocated on first use.
#[derive(Default)]
struct Rare {
    /// Will of a non-managed session (State keeps the will of managed ones).
    will: Option<LastWill>,
    aliases: BTreeMap<u16, String>,
    /// Incoming QoS 2 packet ids waiting for PUBREL.
    in_qos2: BTreeSet<u16>,
    /// State in-flight entries sent on this connection, by packet id.
    state_sent: BTreeMap<u16, Sent>,
}

/// The permission checks whose last answer a connection remembers.
#[derive(Clone, Copy)]
enum Access {
    Publish,
    Receive,
}

/// Asks `ask` (given the connection's user name) whether the connection may
/// publish to / receive `topic`, through the connection's remembered answer
/// when the authenticator allows reuse (`epoch` is its `decision_epoch`).
/// Without reuse no cold part is allocated.
fn may(
    cold: &mut Option<Box<Cold>>,
    epoch: Option<u64>,
    access: Access,
    topic: &str,
    ask: impl FnOnce(Option<&str>) -> bool,
) -> bool {
    if epoch.is_none() {
        return ask(cold.as_ref().and_then(|c| c.username.as_deref()));
    }
    let cold = cold.get_or_insert_with(Default::default);
    let username = cold.username.as_deref();
    let last = match access {
        Access::Publish => &mut cold.may_publish,
        Access::Receive => &mut cold.may_receive,
    };
    last.check(epoch, topic, || ask(username))
}

static NO_IDS: BTreeSet<u16> = BTreeSet::new();
static NO_SENT: BTreeMap<u16, Sent> = BTreeMap::new();

/// The CONNACK answer to a refused CONNECT.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    io: &mut Io<S>,
    version: ProtocolVersion,
    code: u8,
) {
    io.send(
        &Packet::ConnAck(ConnAck { session_present: false, reason_code: code, ..Default::default() }),
        version,
        &inner.metrics,
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), io.write_out(&inner.metrics)).await;
}

/// CONNACK 0x9C "use another server" with the leader as Server Reference
/// when known (MQTT 5); 3.1.1 gets return code 3 "server unavailable".
async fn refuse_not_serving<S: AsyncRead + AsyncWrite + Unpin>(
    inner: &Inner,
    io: &mut Io<S>,
    version: ProtocolVersion,
) {
    let mut properties = ConnAckProperties::default();
    if version.is_v5() {
        properties.server_reference = inner.serving.server_reference();
    }
    let ack = ConnAck { session_present: false, reason_code: reason::USE_ANOTHER_SERVER, properties };
    io.send(&Packet::ConnAck(ack), version, &inner.metrics);
    let _ = tokio::time::timeout(Duration::from_secs(1), io.write_out(&inner.metrics)).await;
}

fn random_client_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let n: u64 = rng.random();
    format!("raftmq-{n:016x}")
}

/// Handles CONNECT: checks, authentication, takeover, session open, CONNACK.
async fn accept<S>(inner: Arc<Inner>, mut io: Io<S>, c: Connect, peer: SocketAddr) -> Option<Conn<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let version = c.protocol.0;
    if !inner.serving.is_on() {
        // Not the serving leader (serving.rs): point the client elsewhere.
        Box::pin(refuse_not_serving(&inner, &mut io, version)).await;
        return None;
    }
    if io.rbuf.is_empty() {
        // Do not keep the CONNECT's read chunk alive for the connection's lifetime.
        io.rbuf = BytesMut::new();
    }
    let cfg = &inner.config;
    let v5 = version.is_v5();
    if v5 && c.properties.authentication_method.is_some() {
        Box::pin(refuse(&inner, &mut io, version, reason::BAD_AUTHENTICATION_METHOD)).await;
        return None;
    }
    let mut assigned = None;
    let client_id: String = if c.client_id.is_empty() {
        if !v5 && !c.clean_start {
            Box::pin(refuse(&inner, &mut io, version, reason::CLIENT_IDENTIFIER_NOT_VALID)).await;
            return None;
        }
        let id = random_client_id();
        if v5 {
            assigned = Some(id.clone());
        }
        id
    } else {
        c.client_id.clone()
    };
    let decision = inner.auth.authenticate(&AuthRequest {
        client_id: &client_id,
        username: c.username.as_deref(),
        password: c.password.as_deref(),
        peer,
    });
    if decision != AuthDecision::Allow {
        Box::pin(refuse(&inner, &mut io, version, decision.reason_code())).await;
        return None;
    }
    // `peer` is the client's address (from the PROXY header behind a load balancer).
    tracing::debug!(client_id = %client_id, %peer, "client authenticated");
    if inner.shutting_down.load(Ordering::Relaxed) {
        Box::pin(refuse(&inner, &mut io, version, reason::SERVER_UNAVAILABLE)).await;
        return None;
    }
    if Metrics::get(&inner.metrics.clients_connected) >= cfg.max_connections as u64 {
        Metrics::inc(&inner.metrics.connections_refused);
        Box::pin(refuse(&inner, &mut io, version, reason::QUOTA_EXCEEDED)).await;
        return None;
    }

    // Session expiry: MQTT 5 property, MQTT 3.1.1 clean session 0 = never.
    let requested_expiry = if v5 {
        c.properties.session_expiry_interval.unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        u32::MAX
    };
    let session_expiry = requested_expiry.min(cfg.max_session_expiry);
    let persistent = session_expiry > 0;

    // Attach to the client id's mailbox, taking the session over if needed.
    let conn_id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let mailbox = loop {
        let wait = {
            // Attach under the registry lock: a finishing connection removes
            // a mailbox only while nothing is attached to it.
            let mut reg = inner.registry.lock();
            let (mb, _) = reg.get_or_create(&client_id);
            match mb.attach(conn_id) {
                Ok(()) => break mb,
                Err(rx) => rx,
            }
        };
        if Box::pin(tokio::time::timeout(TAKEOVER_TIMEOUT, wait)).await.is_err() {
            Box::pin(refuse(&inner, &mut io, version, reason::SERVER_BUSY)).await;
            return None;
        }
    };
    let username: Option<Arc<str>> = c.username.as_deref().map(Arc::from);
    mailbox.set_username(username.clone());

    let state_has = inner.state.read().session(&client_id).is_some();
    let managed = persistent || (state_has && !c.clean_start);
    let mut session_present = false;
    let mut qos0 = Vec::new();
    let was_persistent = mailbox.is_managed();
    if managed {
        let will = c.will.as_ref().map(will_to_pb);
        let open = pb::SessionOpen {
            client_id: client_id.clone(),
            clean_start: c.clean_start,
            session_expiry_s: session_expiry,
            receive_maximum: u32::from(c.properties.receive_maximum.unwrap_or(u16::MAX)),
            protocol_version: u32::from(version.level()),
            will,
            connection_id: conn_id,
        };
        match Box::pin(inner.pipeline.propose(pb::Command { cmd: Some(pb::command::Cmd::SessionOpen(open)) }))
            .await
        {
            Ok(applied) => {
                session_present = applied.session_present;
                qos0 = applied.qos0_to_send;
            }
            Err(e) => {
                tracing::warn!(client_id, error = %e, "session open failed");
                detach_and_forget(&inner, &mailbox, conn_id, true);
                Box::pin(refuse(&inner, &mut io, version, reason::UNSPECIFIED_ERROR)).await;
                return None;
            }
        }
        if !was_persistent {
            Metrics::inc(&inner.metrics.sessions_persistent);
        }
    } else if state_has {
        // A clean, non-persistent session replaces a stored one.
        let rm = pb::SessionRemove { client_id: client_id.clone() };
        let _ =
            Box::pin(inner.pipeline.propose(pb::Command { cmd: Some(pb::command::Cmd::SessionRemove(rm)) }))
                .await;
        if was_persistent {
            Metrics::dec(&inner.metrics.sessions_persistent);
        }
    }
    if !session_present {
        // Whatever the router still holds for an older session of this id goes,
        // and so does anything already routed for it (in this order: see
        // `start_new_session`).
        inner.drop_subscriptions(&mailbox);
        mailbox.start_new_session();
    }
    mailbox.set_managed(managed);

    // Keep alive (MQTT 5: the server may impose a lower one).
    let mut keep_alive = c.keep_alive;
    let mut server_keep_alive = None;
    if v5 && keep_alive > cfg.max_keep_alive {
        keep_alive = cfg.max_keep_alive;
        server_keep_alive = Some(keep_alive);
    }
    mailbox.touch(inner.now_coarse());
    mailbox.set_keepalive(keep_alive);

    let mut props = ConnAckProperties::default();
    if v5 {
        if session_expiry != requested_expiry {
            props.session_expiry_interval = Some(session_expiry);
        }
        if cfg.receive_maximum != u16::MAX {
            props.receive_maximum = Some(cfg.receive_maximum.max(1));
        }
        props.maximum_packet_size = Some(cfg.max_packet_size);
        if cfg.topic_alias_maximum > 0 {
            props.topic_alias_maximum = Some(cfg.topic_alias_maximum);
        }
        props.retain_available = Some(cfg.retain_available);
        props.wildcard_subscription_available = Some(true);
        props.subscription_identifiers_available = Some(true);
        props.shared_subscription_available = Some(true);
        props.server_keep_alive = server_keep_alive;
        props.assigned_client_identifier = assigned;
        if c.properties.request_response_information == Some(true) {
            props.response_information = Some(format!("raftmq/response/{client_id}/"));
        }
    }
    io.send(
        &Packet::ConnAck(ConnAck { session_present, reason_code: reason::SUCCESS, properties: props }),
        version,
        &inner.metrics,
    );
    inner.metrics.client_connected();

    let mut conn = Conn {
        version,
        conn_id,
        mailbox,
        managed,
        session_expiry,
        client_receive_max: c.properties.receive_maximum.unwrap_or(u16::MAX).max(1),
        client_max_packet: c.properties.maximum_packet_size.unwrap_or(u32::MAX),
        topic_alias_max: cfg.topic_alias_maximum,
        in_unacked: 0,
        next_pid: 1,
        resume_dup: session_present,
        state_deferred: false,
        flow: None,
        cold: None,
        io,
        inner,
    };
    let will = if managed { None } else { c.will };
    if username.is_some() {
        conn.cold().username = username;
    }
    if will.is_some() {
        conn.rare().will = will;
    }
    // Queued QoS 0 messages, then the State window (resent with DUP on resume).
    for d in qos0 {
        let msg = Arc::new(message_from_pb(&d.message, 0));
        conn.flow().held.push_back(Delivery {
            msg,
            qos: QoS::AtMostOnce,
            retain: d.retain,
            sub_ids: d.subscription_ids,
        });
    }
    if managed {
        let ids: Vec<u16> = match conn.inner.state.read().session(&conn.mailbox.client_id) {
            Some(s) => s.incoming_qos2().collect(),
            None => Vec::new(),
        };
        if !ids.is_empty() {
            conn.rare().in_qos2.extend(ids);
        }
        conn.scan_state();
    }
    conn.pump_out();
    Some(conn)
}

/// Detaches a connection that failed before it was accepted.
fn detach_and_forget(inner: &Inner, mb: &Arc<Mailbox>, conn_id: u64, forget: bool) {
    let waiting = mb.detach(conn_id);
    if forget && !waiting && !mb.is_managed() {
        let mut reg = inner.registry.lock();
        if mb.attached() == 0 {
            reg.remove_if_same(mb);
        }
    }
}

fn will_to_pb(w: &LastWill) -> pb::Will {
    let msg = will_message(w, 0);
    let mut m = super::message_to_pb(&msg);
    m.expires_at_ms = 0;
    pb::Will {
        message: Some(m),
        delay_s: w.properties.will_delay_interval.unwrap_or(0),
        message_expiry_interval_s: w.properties.message_expiry_interval,
    }
}

/// The dynamic-security response: QoS 0, not retained, from the broker.
fn control_response(payload: Vec<u8>) -> Message {
    Message {
        topic: dynsec::RESPONSE_TOPIC.to_string(),
        payload: bytes::Bytes::from(payload),
        qos: QoS::AtMostOnce,
        retain: false,
        props: PublishProperties::default(),
        expires_at_ms: 0,
        publisher: 0,
    }
}

fn will_message(w: &LastWill, now: u64) -> Message {
    let p = &w.properties;
    Message {
        topic: w.topic.clone(),
        payload: w.payload.clone(),
        qos: w.qos,
        retain: w.retain,
        props: PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: None,
            topic_alias: None,
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user_properties.clone(),
            subscription_identifiers: Vec::new(),
            content_type: p.content_type.clone(),
        },
        expires_at_ms: p.message_expiry_interval.map_or(0, |s| now + u64::from(s) * 1000),
        publisher: 0,
    }
}

impl<S> Conn<S> {
    fn cold(&mut self) -> &mut Cold {
        self.cold.get_or_insert_with(Default::default)
    }

    fn rare(&mut self) -> &mut Rare {
        self.cold().rare.get_or_insert_with(Default::default)
    }

    fn rare_ref(&self) -> Option<&Rare> {
        self.cold.as_ref().and_then(|c| c.rare.as_deref())
    }

    /// The rare part if it exists (never allocates).
    fn rare_mut(&mut self) -> Option<&mut Rare> {
        self.cold.as_mut().and_then(|c| c.rare.as_deref_mut())
    }

    fn flow(&mut self) -> &mut Flow {
        self.flow.get_or_insert_with(Default::default)
    }

    /// Entries of the flow's `pending` in stage `Unsent`.
    fn unsent(&self) -> u32 {
        self.flow.as_ref().map_or(0, |f| f.unsent)
    }

    fn username(&self) -> Option<&str> {
        self.cold.as_ref().and_then(|c| c.username.as_deref())
    }

    fn in_qos2(&self) -> &BTreeSet<u16> {
        self.rare_ref().map_or(&NO_IDS, |r| &r.in_qos2)
    }

    fn state_sent(&self) -> &BTreeMap<u16, Sent> {
        self.rare_ref().map_or(&NO_SENT, |r| &r.state_sent)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn<S> {
    /// Serves the accepted connection until it closes.
    /// Not an `async fn`: that would store `self` twice (the argument, and the
    /// body's copy of it) for the connection's whole life.
    #[allow(clippy::manual_async_fn)] // an `async fn` would store `self` twice
    fn run(mut self) -> impl Future<Output = ()> + Send + 'static {
        async move {
            let close = self.main_loop().await;
            Box::pin(self.finish(close)).await;
        }
    }

    /// Packet handling is synchronous; the rare waits (a full pipeline or ack
    /// queue) are boxed so the task's future stays small. Not an `async fn`,
    /// which would store `self` twice.
    #[allow(clippy::manual_async_fn)] // an `async fn` would store `self` twice
    fn main_loop(&mut self) -> impl Future<Output = Close> + Send + '_ {
        async move {
            loop {
                let ev = poll_fn(|cx| self.poll_event(cx)).await;
                let ev_kind = if matches!(ev, Ev::Read) { EvKind::Read } else { EvKind::Other };
                let step = match ev {
                    Ev::Read => self.on_read(),
                    Ev::Mailbox(f) => self.on_mailbox(f),
                    Ev::Applied => self.on_applied(),
                    Ev::Closed(c) => Err(c),
                };
                if let Err(c) = step {
                    return c;
                }
                if matches!(ev_kind, EvKind::Read) {
                    // Let the subscribers this input woke run before reading more
                    // (they usually sit in this worker's LIFO slot), so a fast
                    // publisher does not overrun their bounded outboxes.
                    tokio::task::yield_now().await;
                }
                if self.unsent() > 0 {
                    if let Err(c) = Box::pin(self.submit_unsent()).await {
                        return c;
                    }
                }
                if let Some(wait) = self.send_acks() {
                    wait.await;
                }
            }
        }
    }

    /// Hands the subscriber acks to the batching task; when its queue is
    /// full, the wait for room (boxed: the task's future stays small).
    fn send_acks(&mut self) -> Option<Pin<Box<impl Future<Output = ()> + Send + 'static>>> {
        let flow = self.flow.as_mut()?;
        if flow.acks.is_empty() {
            return None;
        }
        let acks = AckMsg::Entries(std::mem::take(&mut flow.acks));
        match self.inner.acks.try_send(acks) {
            Err(mpsc::error::TrySendError::Full(m)) => {
                let tx = self.inner.acks.clone();
                Some(Box::pin(async move {
                    let _ = tx.send(m).await;
                }))
            }
            _ => None,
        }
    }

    /// Proposes the commands that found the pipeline full, in order.
    async fn submit_unsent(&mut self) -> Step {
        let Some(flow) = self.flow.as_mut() else { return Ok(()) };
        for p in flow.pending.iter_mut() {
            if let Stage::Unsent(_) = &p.stage {
                let Stage::Unsent(cmd) = std::mem::replace(&mut p.stage, Stage::Done(None)) else { continue };
                match self.inner.pipeline.submit(*cmd).await {
                    Ok(rx) => p.stage = Stage::Waiting(rx),
                    Err(_) => return Err(Close::server(reason::SERVER_BUSY, "state pipeline closed")),
                }
            }
        }
        flow.unsent = 0;
        Ok(())
    }

    /// Proposes `cmd`; `action` runs once it is applied, in FIFO order.
    fn propose(&mut self, cmd: pb::Command, action: Action) -> Step {
        let flow = self.flow.get_or_insert_with(Default::default);
        let stage = if flow.unsent > 0 {
            flow.unsent += 1;
            Stage::Unsent(Box::new(cmd))
        } else {
            match self.inner.pipeline.try_submit(cmd) {
                Ok(rx) => Stage::Waiting(rx),
                Err(TrySubmitError::Full(cmd)) => {
                    flow.unsent += 1;
                    Stage::Unsent(cmd)
                }
                Err(TrySubmitError::Closed) => {
                    return Err(Close::server(reason::SERVER_BUSY, "state pipeline closed"))
                }
            }
        };
        flow.pending.push_back(Pending { stage, action });
        Ok(())
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Ev> {
        if !self.io.wbuf.is_empty() {
            if let Poll::Ready(Err(_)) = self.io.poll_write_out(cx, &self.inner.metrics) {
                return Poll::Ready(Ev::Closed(Close::Lost));
            }
        }
        let write_ok = self.io.wbuf.len() < WRITE_HIGH;
        if let Some(p) = self.flow.as_mut().and_then(|f| f.pending.front_mut()) {
            match &mut p.stage {
                Stage::Done(_) => return Poll::Ready(Ev::Applied),
                Stage::Waiting(rx) => {
                    if let Poll::Ready(r) = Pin::new(rx).poll(cx) {
                        p.stage = Stage::Done(Some(r));
                        return Poll::Ready(Ev::Applied);
                    }
                }
                Stage::Unsent(_) => {}
            }
        }
        let want_items = write_ok && self.flow.as_ref().is_none_or(|f| f.held.is_empty());
        if let Poll::Ready(f) = self.mailbox.poll_ready(cx, want_items) {
            return Poll::Ready(Ev::Mailbox(f));
        }
        if write_ok && self.unsent() == 0 {
            match self.io.poll_fill(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ev::Closed(Close::Lost)),
                Poll::Ready(Ok(n)) => {
                    Metrics::add(&self.inner.metrics.bytes_received, n as u64);
                    return Poll::Ready(Ev::Read);
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    fn send(&mut self, p: &Packet) {
        self.io.send(p, self.version, &self.inner.metrics);
    }

    fn on_read(&mut self) -> Step {
        self.mailbox.touch(self.inner.now_coarse());
        let max = self.inner.config.max_packet_size as usize;
        loop {
            match protocol::decode(&mut self.io.rbuf, Some(self.version), max) {
                Ok(Some(p)) => {
                    Metrics::inc(&self.inner.metrics.messages_received);
                    self.handle(p)?;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(client_id = %self.mailbox.client_id, error = %e, "bad packet");
                    return Err(Close::server(e.reason_code(), "malformed or invalid packet"));
                }
            }
        }
        if self.io.rbuf.is_empty() {
            // An idle connection keeps no read buffer.
            self.io.rbuf = BytesMut::new();
        }
        Ok(())
    }

    fn handle(&mut self, p: Packet) -> Step {
        match p {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(r) => {
                self.on_puback(r);
                Ok(())
            }
            Packet::PubRec(r) => {
                self.on_pubrec(r)?;
                Ok(())
            }
            Packet::PubRel(r) => self.on_pubrel(r),
            Packet::PubComp(r) => {
                self.on_pubcomp(r);
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                // The client has been quiet for a while: give the flow's
                // queues back if nothing is in them.
                if self.flow.as_ref().is_some_and(|f| f.is_empty()) {
                    self.flow = None;
                }
                Ok(())
            }
            Packet::Disconnect(d) => {
                if let Some(e) = d.session_expiry_interval {
                    if self.session_expiry == 0 && e > 0 {
                        return Err(Close::server(
                            reason::PROTOCOL_ERROR,
                            "session expiry cannot be set at DISCONNECT",
                        ));
                    }
                    self.session_expiry = e.min(self.inner.config.max_session_expiry);
                }
                Err(Close::Client { will: d.reason_code != reason::NORMAL_DISCONNECTION })
            }
            Packet::Connect(_) => Err(Close::server(reason::PROTOCOL_ERROR, "second CONNECT")),
            Packet::Auth(_) => Err(Close::server(
                reason::BAD_AUTHENTICATION_METHOD,
                "enhanced authentication is not supported",
            )),
            _ => Err(Close::server(reason::PROTOCOL_ERROR, "packet not allowed from a client")),
        }
    }

    // ------------------------------------------------------------ PUBLISH in

    fn on_publish(&mut self, p: Publish) -> Step {
        let inner = self.inner.clone();
        let cfg = &inner.config;
        let pid = p.packet_id.unwrap_or(0);
        if p.qos == QoS::ExactlyOnce && self.in_qos2().contains(&pid) {
            // Duplicate of a message waiting for PUBREL: acknowledge, do not route again.
            self.queue_action(Action::Ack {
                packet: Packet::PubRec(PubResp::new(pid)),
                releases_quota: false,
            });
            return Ok(());
        }
        if p.qos != QoS::AtMostOnce && self.in_unacked >= cfg.receive_maximum.max(1) {
            return Err(Close::server(reason::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded"));
        }
        if !p.properties.subscription_identifiers.is_empty() {
            // MQTT 5 3.3.4-6: only the server sends Subscription Identifiers.
            return Err(Close::server(reason::PROTOCOL_ERROR, "subscription identifier in a client PUBLISH"));
        }
        let topic = self.resolve_alias(p.topic, p.properties.topic_alias)?;
        if !topic::valid_topic_name(&topic) {
            return Err(Close::server(reason::TOPIC_NAME_INVALID, "invalid topic name"));
        }
        if p.retain && !cfg.retain_available {
            return Err(Close::server(reason::RETAIN_NOT_SUPPORTED, "retain is not available"));
        }
        Metrics::inc(&self.inner.metrics.publish_received);
        let auth = &self.inner.auth;
        let allowed = may(&mut self.cold, auth.decision_epoch(), Access::Publish, &topic, |user| {
            auth.can_publish(&self.mailbox.client_id, user, &topic)
        });
        if !allowed {
            let ack = match p.qos {
                QoS::AtMostOnce => return Ok(()),
                QoS::AtLeastOnce => Packet::PubAck(PubResp::with_reason(pid, reason::NOT_AUTHORIZED)),
                QoS::ExactlyOnce => Packet::PubRec(PubResp::with_reason(pid, reason::NOT_AUTHORIZED)),
            };
            self.queue_action(Action::Ack { packet: ack, releases_quota: false });
            return Ok(());
        }
        let props = p.properties;
        let expires_at_ms = match props.message_expiry_interval {
            Some(s) => now_ms() + u64::from(s) * 1000,
            None => 0,
        };
        let msg = Arc::new(Message {
            topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            props: PublishProperties {
                message_expiry_interval: None,
                topic_alias: None,
                subscription_identifiers: Vec::new(),
                ..props
            },
            expires_at_ms,
            publisher: self.mailbox.id(),
        });
        let route = self.inner.router.read().route(&msg, cfg.queue_qos0_offline);
        let qos2_state = p.qos == QoS::ExactlyOnce && self.managed;
        let to_state = route.needs_state || msg.retain || qos2_state;
        let ack = match p.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(Packet::PubAck(PubResp::new(pid))),
            QoS::ExactlyOnce => Some(Packet::PubRec(PubResp::new(pid))),
        };
        if p.qos != QoS::AtMostOnce {
            self.in_unacked += 1;
        }
        if p.qos == QoS::ExactlyOnce {
            self.rare().in_qos2.insert(pid);
        }
        if msg.topic.starts_with("$CONTROL/") {
            return self.on_control(&msg, ack);
        }
        if to_state {
            let cmd = publish_command(
                &msg,
                &self.mailbox.client_id,
                route.shared_targets,
                qos2_state.then_some(pid),
            );
            self.propose(cmd, Action::Publish { msg, targets: route.targets, ack })?;
        } else {
            self.queue_action(Action::Publish { msg, targets: route.targets, ack });
        }
        Ok(())
    }

    /// A PUBLISH to `$CONTROL/...` (already allowed by the ACL): never routed
    /// to subscribers. The dynamic-security request goes through the log
    /// (passwords hashed first); its response is published once applied.
    /// Other `$CONTROL` topics have no handler: acknowledged and dropped.
    fn on_control(&mut self, msg: &Message, ack: Option<Packet>) -> Step {
        if msg.topic != dynsec::CONTROL_TOPIC {
            self.queue_action(Action::Control { ack, response: None });
            return Ok(());
        }
        let remote = self.inner.control.get().cloned();
        let initialised = match &remote {
            Some(api) => api.initialised(),
            None => self.inner.state.read().dynsec().is_some(),
        };
        if !initialised {
            let response = crate::state::unavailable_response(&msg.payload, crate::state::NOT_INITIALISED);
            self.queue_action(Action::Control { ack, response: Some(response) });
            return Ok(());
        }
        let request = dynsec::prepare_request(&msg.payload);
        if let Some(api) = remote {
            // Dynamic security lives in another group (dynsec-sync): its
            // answer comes back like a commit of our own.
            let (tx, rx) = oneshot::channel();
            tokio::spawn(async move {
                let reply = match api.submit(request).await {
                    Ok(response) => Ok(Applied { dynsec_response: Some(response), ..Applied::default() }),
                    Err(e) => Err(crate::state::StateError::Unavailable(e)),
                };
                let _ = tx.send(reply);
            });
            self.flow().pending.push_back(Pending {
                stage: Stage::Waiting(rx),
                action: Action::Control { ack, response: None },
            });
            return Ok(());
        }
        let cmd = pb::Command {
            cmd: Some(pb::command::Cmd::DynsecControl(pb::DynsecControl { request: request.into() })),
        };
        self.propose(cmd, Action::Control { ack, response: None })
    }

    fn resolve_alias(&mut self, topic: String, alias: Option<u16>) -> Result<String, Close> {
        let Some(alias) = alias else {
            if topic.is_empty() {
                return Err(Close::server(reason::PROTOCOL_ERROR, "empty topic without topic alias"));
            }
            return Ok(topic);
        };
        if alias == 0 || alias > self.topic_alias_max {
            return Err(Close::server(reason::TOPIC_ALIAS_INVALID, "topic alias out of range"));
        }
        if topic.is_empty() {
            return match self.rare_ref().and_then(|r| r.aliases.get(&alias)) {
                Some(t) => Ok(t.clone()),
                None => Err(Close::server(reason::PROTOCOL_ERROR, "unknown topic alias")),
            };
        }
        self.rare().aliases.insert(alias, topic.clone());
        Ok(topic)
    }

    /// Runs `action` now, or after the pending proposals (per-client order).
    fn queue_action(&mut self, action: Action) {
        match self.flow.as_mut() {
            Some(flow) if !flow.pending.is_empty() => {
                flow.pending.push_back(Pending { stage: Stage::Done(None), action })
            }
            _ => self.run_action(action, None),
        }
    }

    fn on_applied(&mut self) -> Step {
        while let Some(front) = self.flow.as_mut().and_then(|f| f.pending.front_mut()) {
            let result = match &mut front.stage {
                Stage::Unsent(_) => break,
                Stage::Waiting(rx) => match rx.try_recv() {
                    Ok(r) => Some(Ok(r)),
                    Err(oneshot::error::TryRecvError::Empty) => break,
                    Err(oneshot::error::TryRecvError::Closed) => {
                        return Err(Close::server(reason::SERVER_BUSY, "state pipeline closed"));
                    }
                },
                Stage::Done(r) => r.take(),
            };
            let Some(p) = self.flow.as_mut().and_then(|f| f.pending.pop_front()) else { break };
            let reply = match result {
                None => None,
                Some(Ok(r)) => Some(r),
                Some(Err(_)) => return Err(Close::server(reason::SERVER_BUSY, "state pipeline closed")),
            };
            self.run_action(p.action, reply);
        }
        self.pump_out();
        Ok(())
    }

    /// PUBACK/PUBREC to the publisher once its message is handled; an error
    /// reason when the state command failed.
    fn send_publish_ack(&mut self, ack: Option<Packet>, failed: bool) {
        let Some(mut a) = ack else { return };
        if let Packet::PubAck(r) | Packet::PubRec(r) = &mut a {
            if failed {
                r.reason_code = reason::UNSPECIFIED_ERROR;
            }
        }
        let releases = matches!(a, Packet::PubAck(_)) || failed;
        if failed {
            if let Packet::PubRec(r) = &a {
                self.rare().in_qos2.remove(&r.packet_id);
            }
        }
        self.send(&a);
        if releases {
            self.in_unacked = self.in_unacked.saturating_sub(1);
        }
    }

    fn run_action(&mut self, action: Action, reply: Option<Reply>) {
        let failed = matches!(reply, Some(Err(_)));
        if let Some(Err(e)) = &reply {
            tracing::warn!(client_id = %self.mailbox.client_id, error = %e, "state command failed");
        }
        match action {
            Action::Publish { msg, targets, ack } => {
                self.inner.deliver(&msg, targets, false);
                self.send_publish_ack(ack, failed);
            }
            Action::Control { ack, response } => {
                let applied = match reply {
                    Some(Ok(a)) => a.dynsec_response,
                    _ => None,
                };
                let response = response.or(applied);
                if let Some(payload) = response {
                    self.inner.publish_internal(control_response(payload), false, false);
                }
                self.send_publish_ack(ack, failed);
            }
            Action::Nothing => {}
            Action::Ack { packet, releases_quota } => {
                self.send(&packet);
                if releases_quota {
                    self.in_unacked = self.in_unacked.saturating_sub(1);
                }
            }
            Action::SubAck { ack, retained } => {
                let (existed, qos0) = match reply {
                    Some(Ok(a)) => (a.existed, a.qos0_to_send),
                    _ => (Vec::new(), Vec::new()),
                };
                self.send(&Packet::SubAck(ack));
                // Retained copies State delivered (QoS 0 here, QoS 1/2 in its window).
                for d in qos0 {
                    let msg = Arc::new(message_from_pb(&d.message, 0));
                    self.flow().held.push_back(Delivery {
                        msg,
                        qos: QoS::AtMostOnce,
                        retain: d.retain,
                        sub_ids: d.subscription_ids,
                    });
                }
                if self.managed {
                    self.scan_state();
                }
                self.send_retained(retained, &existed);
            }
            Action::UnsubAck(u) => self.send(&Packet::UnsubAck(u)),
        }
    }

    // ------------------------------------------------------------ acks in

    fn on_puback(&mut self, r: PubResp) {
        let pid = r.packet_id;
        if matches!(self.out_flight(pid), Some(f) if f.qos == QoS::AtLeastOnce) {
            self.flow().out_inflight.remove(&pid);
        } else if let Some(Sent::Publish { msg }) = self.state_sent().get(&pid).copied() {
            self.rare().state_sent.insert(pid, Sent::Done { msg });
            self.ack(pid, pb::AckKind::Puback);
        }
        if self.state_deferred {
            self.scan_state();
        }
        self.pump_out();
    }

    fn on_pubrec(&mut self, r: PubResp) -> Step {
        let pid = r.packet_id;
        let refused = r.reason_code >= 0x80;
        if let Some(f) = self.flow.as_mut().and_then(|f| f.out_inflight.get_mut(&pid)) {
            if f.qos == QoS::ExactlyOnce {
                if refused {
                    self.flow().out_inflight.remove(&pid);
                } else {
                    f.released = true;
                    self.send(&Packet::PubRel(PubResp::new(pid)));
                }
            }
        } else if let Some(s) = self.state_sent().get(&pid).copied() {
            match s {
                Sent::Publish { msg } | Sent::Released { msg } if refused => {
                    self.ack(pid, pb::AckKind::Pubrec);
                    self.ack(pid, pb::AckKind::Pubcomp);
                    self.rare().state_sent.insert(pid, Sent::Done { msg });
                }
                Sent::Publish { msg } => {
                    // The PUBREC must be committed before PUBREL goes out: a client
                    // that has seen PUBREL completes and forgets the packet id, so a
                    // new leader that did not know of the PUBREC would resend the
                    // PUBLISH and the client would take it as a new message.
                    self.rare().state_sent.insert(pid, Sent::Released { msg });
                    let entry = pb::AckEntry {
                        client_id: self.mailbox.client_id.to_string(),
                        packet_id: u32::from(pid),
                        kind: pb::AckKind::Pubrec as i32,
                    };
                    let cmd = pb::Command { cmd: Some(pb::command::Cmd::Ack(pb::Ack { acks: vec![entry] })) };
                    let pubrel =
                        Action::Ack { packet: Packet::PubRel(PubResp::new(pid)), releases_quota: false };
                    self.propose(cmd, pubrel)?;
                }
                // A repeated PUBREC: its PUBREL goes out (or went out) once the
                // first one is committed; sending one now could overtake it.
                Sent::Released { .. } | Sent::Done { .. } => {}
            }
        } else if self.version.is_v5() {
            self.send(&Packet::PubRel(PubResp::with_reason(pid, reason::PACKET_IDENTIFIER_NOT_FOUND)));
        } else {
            self.send(&Packet::PubRel(PubResp::new(pid)));
        }
        if self.state_deferred {
            self.scan_state();
        }
        self.pump_out();
        Ok(())
    }

    fn on_pubcomp(&mut self, r: PubResp) {
        let pid = r.packet_id;
        if matches!(self.out_flight(pid), Some(f) if f.released) {
            self.flow().out_inflight.remove(&pid);
        } else if let Some(Sent::Released { msg }) = self.state_sent().get(&pid).copied() {
            self.rare().state_sent.insert(pid, Sent::Done { msg });
            self.ack(pid, pb::AckKind::Pubcomp);
        }
        if self.state_deferred {
            self.scan_state();
        }
        self.pump_out();
    }

    fn on_pubrel(&mut self, r: PubResp) -> Step {
        let pid = r.packet_id;
        if !self.rare().in_qos2.remove(&pid) {
            let code = if self.version.is_v5() { reason::PACKET_IDENTIFIER_NOT_FOUND } else { 0 };
            self.queue_action(Action::Ack {
                packet: Packet::PubComp(PubResp::with_reason(pid, code)),
                releases_quota: false,
            });
            return Ok(());
        }
        let packet = Packet::PubComp(PubResp::new(pid));
        if self.managed {
            let cmd = pb::Command {
                cmd: Some(pb::command::Cmd::Release(pb::Release {
                    client_id: self.mailbox.client_id.to_string(),
                    packet_id: u32::from(pid),
                })),
            };
            self.propose(cmd, Action::Ack { packet, releases_quota: true })?;
        } else {
            self.queue_action(Action::Ack { packet, releases_quota: true });
        }
        Ok(())
    }

    fn ack(&mut self, pid: u16, kind: pb::AckKind) {
        let entry = pb::AckEntry {
            client_id: self.mailbox.client_id.to_string(),
            packet_id: u32::from(pid),
            kind: kind as i32,
        };
        self.flow().acks.push(entry);
    }

    /// Hands the subscriber acks to the batching task (not waiting for State).
    async fn flush_acks(&mut self) {
        let Some(flow) = self.flow.as_mut() else { return };
        if flow.acks.is_empty() {
            return;
        }
        let acks = std::mem::take(&mut flow.acks);
        let _ = self.inner.acks.send(AckMsg::Entries(acks)).await;
    }

    // ------------------------------------------------------------ SUBSCRIBE

    fn on_subscribe(&mut self, s: Subscribe) -> Step {
        let v5 = self.version.is_v5();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut state_subs = Vec::new();
        let mut retained = Vec::new();
        for (filter, opts) in s.filters {
            if !topic::valid_topic_filter(&filter) {
                codes.push(if v5 { reason::TOPIC_FILTER_INVALID } else { 0x80 });
                continue;
            }
            let shared = split_shared(&filter).is_some();
            if shared && opts.no_local {
                return Err(Close::server(reason::PROTOCOL_ERROR, "no local on a shared subscription"));
            }
            if !self.inner.auth.can_subscribe(&self.mailbox.client_id, self.username(), &filter) {
                codes.push(if v5 { reason::NOT_AUTHORIZED } else { 0x80 });
                continue;
            }
            let value = SubValue { opts, sub_id: s.subscription_identifier, mailbox: self.mailbox.clone() };
            let existed = self.inner.router.write().subscribe(&self.mailbox.client_id, &filter, value);
            if !existed {
                Metrics::inc(&self.inner.metrics.subscriptions);
            }
            self.mailbox.add_filter(&filter);
            codes.push(opts.qos as u8);
            let state_idx = if self.managed {
                state_subs.push(pb::Subscription {
                    filter: filter.clone(),
                    qos: opts.qos as u32,
                    no_local: opts.no_local,
                    retain_as_published: opts.retain_as_published,
                    retain_handling: opts.retain_handling as u32,
                    subscription_id: s.subscription_identifier.unwrap_or(0),
                });
                Some(state_subs.len() - 1)
            } else {
                None
            };
            // Persistent sessions get State's retained messages through State
            // (`queue_retained`, so packet ids come from State); `$SYS` is ours.
            let wants_retained = !shared && opts.retain_handling != RetainHandling::DoNotSend;
            if wants_retained && (!self.managed || filter.starts_with('$')) {
                retained.push(RetainReq {
                    filter,
                    opts,
                    sub_id: s.subscription_identifier,
                    state_idx,
                    existed,
                });
            }
        }
        let ack = SubAck { packet_id: s.packet_id, reason_codes: codes, ..Default::default() };
        if state_subs.is_empty() {
            self.queue_action(Action::SubAck { ack, retained });
            return Ok(());
        }
        let cmd = pb::Command {
            cmd: Some(pb::command::Cmd::Subscribe(pb::Subscribe {
                client_id: self.mailbox.client_id.to_string(),
                subscriptions: state_subs,
                queue_retained: true,
            })),
        };
        self.propose(cmd, Action::SubAck { ack, retained })?;
        Ok(())
    }

    /// Retained messages for new subscriptions, per Retain Handling.
    fn send_retained(&mut self, reqs: Vec<RetainReq>, state_existed: &[bool]) {
        if reqs.is_empty() {
            return;
        }
        let now = now_ms();
        for r in reqs {
            let existed = match r.state_idx {
                Some(i) => state_existed.get(i).copied().unwrap_or(r.existed),
                None => r.existed,
            };
            if r.opts.retain_handling == RetainHandling::SendIfNew && existed {
                continue;
            }
            let sub_ids: Vec<u32> = r.sub_id.into_iter().collect();
            let msgs: Vec<Message> = if self.managed {
                Vec::new()
            } else {
                let st = self.inner.state.read();
                st.retained_matching(&r.filter, now).into_iter().map(|m| message_from_pb(m, 0)).collect()
            };
            for m in msgs {
                let qos = m.qos.min(r.opts.qos);
                self.flow().held.push_back(Delivery {
                    msg: Arc::new(m),
                    qos,
                    retain: true,
                    sub_ids: sub_ids.clone(),
                });
            }
            if r.filter.starts_with('$') {
                let sys = self.inner.sys_retained.lock().clone();
                for m in sys.into_iter().filter(|m| topic::matches(&r.filter, &m.topic)) {
                    self.flow().held.push_back(Delivery {
                        msg: m,
                        qos: QoS::AtMostOnce,
                        retain: true,
                        sub_ids: sub_ids.clone(),
                    });
                }
            }
        }
        self.pump_out();
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) -> Step {
        let mut codes = Vec::with_capacity(u.filters.len());
        let mut allowed_filters = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            if !self.inner.auth.can_unsubscribe(&self.mailbox.client_id, self.username(), f) {
                // Denied: the subscription stays (MQTT 5 0x87).
                codes.push(reason::NOT_AUTHORIZED);
                continue;
            }
            allowed_filters.push(f.clone());
            let existed = self.inner.router.write().unsubscribe(&self.mailbox.client_id, f);
            if existed {
                Metrics::dec(&self.inner.metrics.subscriptions);
            }
            self.mailbox.remove_filter(f);
            codes.push(if existed { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
        }
        let ack = UnsubAck { packet_id: u.packet_id, reason_codes: codes, ..Default::default() };
        if !self.managed || allowed_filters.is_empty() {
            self.queue_action(Action::UnsubAck(ack));
            return Ok(());
        }
        let cmd = pb::Command {
            cmd: Some(pb::command::Cmd::Unsubscribe(pb::Unsubscribe {
                client_id: self.mailbox.client_id.to_string(),
                filters: allowed_filters,
            })),
        };
        self.propose(cmd, Action::UnsubAck(ack))?;
        Ok(())
    }

    // ------------------------------------------------------------ PUBLISH out

    fn on_mailbox(&mut self, flags: u8) -> Step {
        if flags & flag::SHUTDOWN != 0 {
            return Err(Close::server(reason::SERVER_SHUTTING_DOWN, "server shutting down"));
        }
        if flags & flag::NOT_SERVING != 0 {
            return Err(Close::server(reason::USE_ANOTHER_SERVER, "not the leader"));
        }
        if flags & flag::KICK != 0 {
            if self.managed {
                self.drop_denied_subscriptions()?;
            }
            return Err(Close::server(reason::ADMINISTRATIVE_ACTION, "administrative action"));
        }
        if flags & flag::TAKEOVER != 0 {
            return Err(Close::server(reason::SESSION_TAKEN_OVER, "session taken over"));
        }
        if flags & flag::KEEPALIVE != 0 && self.mailbox.keepalive_expired(self.inner.now_coarse()) {
            return Err(Close::server(reason::KEEP_ALIVE_TIMEOUT, "keep alive timeout"));
        }
        if flags & flag::STATE != 0 {
            self.scan_state();
        }
        self.pump_out();
        Ok(())
    }

    /// A kicked persistent session keeps only the subscriptions its new
    /// rights still allow (Mosquitto re-checks them; CVE-2021-34434).
    fn drop_denied_subscriptions(&mut self) -> Step {
        let filters: Vec<String> = match self.inner.state.read().session(&self.mailbox.client_id) {
            Some(s) => s.subscriptions.keys().cloned().collect(),
            None => return Ok(()),
        };
        let denied: Vec<String> = filters
            .into_iter()
            .filter(|f| !self.inner.auth.can_subscribe(&self.mailbox.client_id, self.username(), f))
            .collect();
        if denied.is_empty() {
            return Ok(());
        }
        for f in &denied {
            if self.inner.router.write().unsubscribe(&self.mailbox.client_id, f) {
                Metrics::dec(&self.inner.metrics.subscriptions);
            }
            self.mailbox.remove_filter(f);
        }
        let cmd = pb::Command {
            cmd: Some(pb::command::Cmd::Unsubscribe(pb::Unsubscribe {
                client_id: self.mailbox.client_id.to_string(),
                filters: denied,
            })),
        };
        self.propose(cmd, Action::Nothing)
    }

    fn window(&self) -> usize {
        usize::from(self.client_receive_max.min(self.inner.config.max_inflight.max(1)))
    }

    /// The fast-path publish sent with packet id `pid`, not yet acknowledged.
    fn out_flight(&self, pid: u16) -> Option<&OutFlight> {
        self.flow.as_ref()?.out_inflight.get(&pid)
    }

    fn inflight_count(&self) -> usize {
        self.flow.as_ref().map_or(0, |f| f.out_inflight.len())
            + self.state_sent().values().filter(|s| !matches!(s, Sent::Done { .. })).count()
    }

    /// Sends fast-path deliveries while the window and the socket allow.
    fn pump_out(&mut self) {
        loop {
            if self.flow.as_ref().is_none_or(|f| f.held.is_empty()) {
                // The flow's queues are allocated only when there is something to hold.
                self.mailbox.drain(|| &mut self.flow.get_or_insert_with(Default::default).held, DRAIN);
                if self.flow.as_ref().is_none_or(|f| f.held.is_empty()) {
                    return;
                }
            }
            let window = self.window();
            let mut room = window.saturating_sub(self.flow().out_inflight.len());
            loop {
                let flow = self.flow();
                let Some(d) = flow.held.front() else { break };
                if d.qos != QoS::AtMostOnce {
                    if room == 0 {
                        return;
                    }
                    room -= 1;
                }
                let Some(d) = flow.held.pop_front() else { break };
                self.send_delivery(d);
            }
            if self.io.wbuf.len() >= WRITE_HIGH {
                return;
            }
        }
    }

    fn send_delivery(&mut self, d: Delivery) {
        let expiry = if d.msg.expires_at_ms == 0 {
            None
        } else {
            match d.msg.remaining_expiry(now_ms()) {
                Ok(e) => e,
                Err(()) => {
                    Metrics::inc(&self.inner.metrics.messages_expired);
                    return;
                }
            }
        };
        let pid = if d.qos == QoS::AtMostOnce { None } else { self.alloc_pid() };
        if d.qos != QoS::AtMostOnce && pid.is_none() {
            return;
        }
        let v5 = self.version.is_v5();
        let pkt = Packet::Publish(Publish {
            dup: false,
            qos: d.qos,
            retain: d.retain,
            topic: d.msg.topic.clone(),
            packet_id: pid,
            properties: if v5 {
                PublishProperties {
                    message_expiry_interval: expiry,
                    subscription_identifiers: d.sub_ids,
                    ..d.msg.props.clone()
                }
            } else {
                PublishProperties::default()
            },
            payload: d.msg.payload.clone(),
        });
        if !self.fits(&pkt) {
            return;
        }
        self.send(&pkt);
        Metrics::inc(&self.inner.metrics.publish_sent);
        if let Some(pid) = pid {
            self.flow().out_inflight.insert(pid, OutFlight { qos: d.qos, released: false });
        }
    }

    /// MQTT 5 3.1.2.11.4: a packet over the client's Maximum Packet Size is dropped.
    fn fits(&self, pkt: &Packet) -> bool {
        if self.client_max_packet == u32::MAX {
            return true;
        }
        let ok = protocol::encoded_len(pkt, self.version) <= self.client_max_packet as usize;
        if !ok {
            Metrics::inc(&self.inner.metrics.messages_dropped_too_large);
        }
        ok
    }

    fn alloc_pid(&mut self) -> Option<u16> {
        // Ids in use in State's window are off limits too (managed sessions).
        let state_ids: HashSet<u16> = if self.managed {
            match self.inner.state.read().session(&self.mailbox.client_id) {
                Some(s) => s.inflight().map(|e| e.packet_id).collect(),
                None => HashSet::new(),
            }
        } else {
            HashSet::new()
        };
        for _ in 0..u16::MAX {
            let pid = self.next_pid;
            self.next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
            if self.out_flight(pid).is_none()
                && !self.state_sent().contains_key(&pid)
                && !state_ids.contains(&pid)
            {
                return Some(pid);
            }
        }
        None
    }

    /// A State in-flight message this connection will not send (expired,
    /// too large, or not allowed): acknowledged in the client's place so the
    /// window moves on.
    fn drop_state_delivery(&mut self, pid: u16, qos: u8, msg_key: usize) {
        self.rare().state_sent.insert(pid, Sent::Done { msg: msg_key });
        let kind = if qos == 2 { pb::AckKind::Pubcomp } else { pb::AckKind::Puback };
        self.ack(pid, kind);
    }

    /// Sends State's in-flight messages of this session not yet sent on this
    /// connection (PUBLISH, or PUBREL for those waiting for PUBCOMP).
    fn scan_state(&mut self) {
        let inner = self.inner.clone();
        let st = inner.state.read();
        let Some(sess) = st.session(&self.mailbox.client_id) else {
            if let Some(r) = self.rare_mut() {
                r.state_sent.clear();
            }
            return;
        };
        let dup = self.resume_dup;
        self.resume_dup = false;
        self.state_deferred = false;
        let mut present: HashSet<u16> = HashSet::with_capacity(sess.inflight_len());
        let mut budget = usize::from(self.client_receive_max).saturating_sub(self.inflight_count());
        let now = now_ms();
        for e in sess.inflight() {
            let pid = e.packet_id;
            let msg_key = Arc::as_ptr(&e.delivery.message) as usize;
            present.insert(pid);
            match self.state_sent().get(&pid) {
                Some(s) if s.msg() == msg_key => continue,
                _ => {}
            }
            if self.out_flight(pid).is_some() {
                // A fast-path message still uses this id; send once it is acknowledged.
                continue;
            }
            if e.awaiting_pubcomp {
                budget = budget.saturating_sub(1);
                self.io.send(&Packet::PubRel(PubResp::new(pid)), self.version, &inner.metrics);
                self.rare().state_sent.insert(pid, Sent::Released { msg: msg_key });
                continue;
            }
            if budget == 0 {
                // The client's Receive Maximum is reached (e.g. it resumed with a
                // smaller one): send it when an acknowledgement frees room.
                self.state_deferred = true;
                continue;
            }
            budget -= 1;
            let m = &e.delivery.message;
            let auth = &inner.auth;
            let allowed = may(&mut self.cold, auth.decision_epoch(), Access::Receive, &m.topic, |user| {
                auth.can_receive(&self.mailbox.client_id, user, &m.topic)
            });
            if !allowed {
                // publishClientReceive denies it now: dropped as if acknowledged.
                self.drop_state_delivery(pid, e.delivery.qos, msg_key);
                continue;
            }
            let expiry = if m.expires_at_ms == 0 {
                None
            } else if m.expires_at_ms <= now {
                // Expired in flight: drop it as if acknowledged.
                Metrics::inc(&inner.metrics.messages_expired);
                self.drop_state_delivery(pid, e.delivery.qos, msg_key);
                continue;
            } else {
                Some(u32::try_from((m.expires_at_ms - now).div_ceil(1000)).unwrap_or(u32::MAX))
            };
            let base = message_from_pb(m, 0);
            let v5 = self.version.is_v5();
            let pkt = Packet::Publish(Publish {
                dup,
                qos: QoS::from_u8(e.delivery.qos).unwrap_or(QoS::AtLeastOnce),
                retain: e.delivery.retain,
                topic: base.topic,
                packet_id: Some(pid),
                properties: if v5 {
                    PublishProperties {
                        message_expiry_interval: expiry,
                        subscription_identifiers: e.delivery.subscription_ids.clone(),
                        ..base.props
                    }
                } else {
                    PublishProperties::default()
                },
                payload: base.payload,
            });
            if !self.fits(&pkt) {
                // Too large for this client: acknowledge it ourselves so the window moves on.
                self.drop_state_delivery(pid, e.delivery.qos, msg_key);
                continue;
            }
            self.io.send(&pkt, self.version, &inner.metrics);
            Metrics::inc(&inner.metrics.publish_sent);
            self.rare().state_sent.insert(pid, Sent::Publish { msg: msg_key });
        }
        self.rare().state_sent.retain(|pid, _| present.contains(pid));
    }

    // ------------------------------------------------------------ the end

    async fn finish(mut self, close: Close) {
        let metrics = self.inner.metrics.clone();
        // A kick by dynamic security ends the connection without its will.
        let publish_will = !matches!(
            close,
            Close::Client { will: false } | Close::Server { reason: reason::ADMINISTRATIVE_ACTION, .. }
        );
        // This node stopped serving: nothing it proposes can commit any more,
        // and the next leader ends the session (ResetConnections, wills). Drop
        // what was pending without acknowledging it.
        let stepped_down = matches!(close, Close::Server { reason: reason::USE_ANOTHER_SERVER, .. });
        if stepped_down {
            if let Some(flow) = self.flow.as_mut() {
                flow.pending.clear();
                flow.unsent = 0;
                flow.acks.clear();
            }
        }
        // The session is offline from now on: the router hands its messages to
        // State (queued for a persistent session) instead of this closing
        // connection, and SessionClose takes its place in the pipeline at once.
        self.mailbox.set_offline();
        let pending = self.flow.as_mut().map(|f| &mut f.pending);
        for p in pending.into_iter().flat_map(|p| p.iter_mut()) {
            if let Stage::Unsent(_) = &p.stage {
                let Stage::Unsent(cmd) = std::mem::replace(&mut p.stage, Stage::Done(None)) else { continue };
                if let Ok(rx) = self.inner.pipeline.submit(*cmd).await {
                    p.stage = Stage::Waiting(rx);
                }
            }
        }
        let session_close = if self.managed && !stepped_down {
            let close_cmd = pb::SessionClose {
                client_id: self.mailbox.client_id.to_string(),
                session_expiry_s: Some(self.session_expiry),
                publish_will,
                connection_id: self.conn_id,
            };
            let cmd = pb::Command { cmd: Some(pb::command::Cmd::SessionClose(close_cmd)) };
            self.inner.pipeline.submit(cmd).await.ok()
        } else {
            None
        };

        // Not on shutdown: Broker::shutdown waits for every connection to end.
        let linger = matches!(close, Close::Server { reason, .. } if reason != reason::SERVER_SHUTTING_DOWN);
        if let Close::Server { reason, text } = close {
            tracing::debug!(client_id = %self.mailbox.client_id, reason, text, "server closes connection");
            if self.version.is_v5() && reason >= 0x80 {
                let mut d = Disconnect::with_reason(reason, text);
                if reason == reason::USE_ANOTHER_SERVER {
                    d.server_reference = self.inner.serving.server_reference();
                }
                self.send(&Packet::Disconnect(d));
            }
        }
        if !self.io.wbuf.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.io.write_out(&metrics)).await;
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::io::AsyncWriteExt::shutdown(&mut self.io.stream),
        )
        .await;

        // Proposals still in flight are applied anyway; their fast-path copies still go out.
        while let Some(p) = self.flow.as_mut().and_then(|f| f.pending.pop_front()) {
            let reply = match p.stage {
                Stage::Unsent(_) => break,
                Stage::Waiting(rx) => match rx.await {
                    Ok(r) => r,
                    Err(_) => break,
                },
                Stage::Done(Some(Ok(r))) => r,
                Stage::Done(_) => Ok(Applied::default()),
            };
            if let Action::Publish { msg, targets, .. } = p.action {
                if reply.is_ok() {
                    self.inner.deliver(&msg, targets, false);
                }
            }
        }

        if self.managed && !stepped_down {
            // Subscriber acks reach State before anyone can resume the session.
            self.flush_acks().await;
            let (tx, rx) = oneshot::channel();
            if self.inner.acks.send(AckMsg::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
            match session_close {
                Some(rx) => match rx.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(client_id = %self.mailbox.client_id, error = %e, "session close failed")
                    }
                    Err(_) => {
                        tracing::warn!(client_id = %self.mailbox.client_id, "session close not applied")
                    }
                },
                None => tracing::warn!(client_id = %self.mailbox.client_id, "session close not proposed"),
            }
        } else if publish_will && !stepped_down {
            if let Some(w) = self.rare_mut().and_then(|r| r.will.take()) {
                // A non-persistent session ends with its connection, so the will
                // is due now whatever its delay (MQTT 5 3.1.3.2.2: delay or session end).
                let msg = will_message(&w, now_ms());
                self.inner.publish_internal(msg, false, true);
            }
        }

        let session_ended = !self.managed || self.session_expiry == 0;
        if session_ended {
            // Before detaching: once detached, a new connection may attach and
            // subscribe, and its filters must not be taken for this session's.
            self.inner.drop_subscriptions(&self.mailbox);
            // Before detaching too: a takeover may make the mailbox a
            // persistent session's again as soon as it is detached.
            self.mailbox.set_managed(false);
        }
        let waiting = self.mailbox.detach(self.conn_id);
        if session_ended {
            if self.managed {
                Metrics::dec(&metrics.sessions_persistent);
            }
            if !waiting {
                let mut reg = self.inner.registry.lock();
                if self.mailbox.attached() == 0 {
                    reg.remove_if_same(&self.mailbox);
                }
            }
        }
        Metrics::dec(&metrics.clients_connected);
        if linger {
            // Boxed: its timer would otherwise grow every connection's task.
            Box::pin(self.linger()).await;
        }
        Metrics::dec(&metrics.connections_open);
    }

    /// Lingering close, after the server closed the connection (and sent its
    /// DISCONNECT, MQTT 5): reads and drops what the client still sends until
    /// it closes too, for `LINGER` at most. A client often keeps writing for a
    /// moment (acknowledging what it read before the DISCONNECT); a socket
    /// closed with such bytes unread, or receiving them afterwards, is reset by
    /// the kernel, and the reset fails the client's writes and can discard the
    /// DISCONNECT still in its receive buffer (as in RFC 9112 9.6). The session
    /// is already closed here; only the socket waits.
    async fn linger(&mut self) {
        let io = &mut self.io;
        let drain = async {
            loop {
                match poll_fn(|cx| io.poll_fill(cx)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => io.rbuf.clear(),
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
}

#[cfg(test)]
pub(crate) fn conn_size<S>() -> usize {
    std::mem::size_of::<Conn<S>>()
}

/// The box an authenticated idle connection keeps besides `Conn`.
#[cfg(test)]
pub(crate) fn cold_size() -> usize {
    std::mem::size_of::<Cold>()
}
