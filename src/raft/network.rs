//! The client side of the cluster transport: openraft's `RaftNetworkV2` over
//! protobuf frames (`raft.RaftRequest` / `raft.RaftResponse`, length-delimited,
//! at most [`MAX_FRAME`] bytes) on TCP, optionally mutual TLS.
//!
//! openraft opens one [`PeerClient`] per peer and purpose (replication,
//! heartbeats, snapshots) and calls it sequentially; each client keeps one
//! connection, reused for every RPC, with one request in flight, matched to
//! its response by id. A failed or timed-out call drops the connection (a late
//! response must never answer the next request); the next call reconnects,
//! after a backoff doubling from 20 ms to 500 ms while the peer stays down.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RPCTypes};
use parking_lot::Mutex;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::latency::LatencyHistogram;

use super::convert::{self, ConvertError};
use super::pb;
use super::pb::raft_request::Request;
use super::pb::raft_response::Response;
use super::tls::ClusterTls;
use super::types::{NodeAddr, NodeId, Snapshot, TypeConfig, Vote};

/// Largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Snapshot bytes per chunk (a chunk is one frame).
pub const SNAPSHOT_CHUNK: usize = 4 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Installing the last chunk applies the whole snapshot on the receiver.
const SNAPSHOT_INSTALL_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Io for T {}

/// A framed cluster connection (either side).
pub(crate) type Conn = Framed<Box<dyn Io>, LengthDelimitedCodec>;

pub(crate) fn framed(io: Box<dyn Io>) -> Conn {
    LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME).new_framed(io)
}

/// Why one call failed.
#[derive(thiserror::Error, Debug)]
pub enum CallError {
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    #[error("network: {0}")]
    Network(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("peer answered with an error: {0}")]
    Remote(String),
    #[error("invalid response: {0}")]
    Invalid(#[from] ConvertError),
}

/// How long replication takes, per peer: from sending an AppendEntries that
/// carries entries to its answer, so the peer's append and fsync included
/// (heartbeats, which carry none, are left out). Shared by every client this
/// node opens; a peer's series starts with its first client.
#[derive(Debug, Default)]
pub struct ReplicationStats {
    peers: Mutex<BTreeMap<NodeId, Arc<LatencyHistogram>>>,
}

impl ReplicationStats {
    fn for_peer(&self, peer: NodeId) -> Arc<LatencyHistogram> {
        self.peers.lock().entry(peer).or_default().clone()
    }

    /// Appends `raftmq_raft_replication_latency_seconds{peer="ID"}`.
    pub fn render_prometheus(&self, out: &mut String) {
        let name = "raftmq_raft_replication_latency_seconds";
        crate::latency::render_header(
            out,
            name,
            "From sending entries to a peer to its answer (its append and fsync included), per peer.",
        );
        for (peer, h) in self.peers.lock().iter() {
            h.render_series(out, name, &format!("peer=\"{peer}\""));
        }
    }
}

/// Creates the per-peer clients openraft asks for.
pub struct NetworkFactory {
    node_id: NodeId,
    tls: Option<ClusterTls>,
    stats: Arc<ReplicationStats>,
}

impl NetworkFactory {
    pub fn new(node_id: NodeId, tls: Option<ClusterTls>, stats: Arc<ReplicationStats>) -> NetworkFactory {
        NetworkFactory { node_id, tls, stats }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> PeerClient {
        PeerClient::new(self.node_id, target, node.cluster_addr.clone(), self.tls.clone())
            .with_latency(self.stats.for_peer(target))
    }
}

/// One connection to one peer. See the module docs.
pub struct PeerClient {
    node_id: NodeId,
    target: NodeId,
    addr: String,
    tls: Option<ClusterTls>,
    conn: Option<Conn>,
    next_id: u64,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Where replication round trips to this peer are recorded.
    latency: Option<Arc<LatencyHistogram>>,
}

impl PeerClient {
    pub fn new(node_id: NodeId, target: NodeId, addr: String, tls: Option<ClusterTls>) -> PeerClient {
        PeerClient {
            node_id,
            target,
            addr,
            tls,
            conn: None,
            next_id: 0,
            backoff: BACKOFF_MIN,
            retry_at: None,
            latency: None,
        }
    }

    /// Records the round trip of every AppendEntries that carries entries here.
    pub fn with_latency(mut self, latency: Arc<LatencyHistogram>) -> PeerClient {
        self.latency = Some(latency);
        self
    }

    async fn establish(&self) -> Result<Conn, CallError> {
        let unreachable = |e: &dyn std::fmt::Display| CallError::Unreachable(format!("{}: {e}", self.addr));
        let tcp = TcpStream::connect(&self.addr).await.map_err(|e| unreachable(&e))?;
        tcp.set_nodelay(true).map_err(|e| unreachable(&e))?;
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let name = tls.name_for(&self.addr).map_err(|e| unreachable(&e))?;
                Box::new(tls.connector.connect(name, tcp).await.map_err(|e| unreachable(&e))?)
            }
        };
        Ok(framed(io))
    }

    async fn ensure_connected(&mut self) -> Result<(), CallError> {
        if self.conn.is_some() {
            return Ok(());
        }
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                return Err(CallError::Unreachable(format!(
                    "{}: backing off after a failed connect",
                    self.addr
                )));
            }
        }
        let result = match tokio::time::timeout(CONNECT_TIMEOUT, self.establish()).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Unreachable(format!("{}: connect timed out", self.addr))),
        };
        match result {
            Ok(conn) => {
                self.conn = Some(conn);
                self.backoff = BACKOFF_MIN;
                self.retry_at = None;
                Ok(())
            }
            Err(e) => {
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                Err(e)
            }
        }
    }

    /// Sends one request and waits for its response, at most `ttl`.
    pub async fn call(&mut self, request: Request, ttl: Duration) -> Result<Response, CallError> {
        self.ensure_connected().await?;
        self.next_id += 1;
        let id = self.next_id;
        let frame = Bytes::from(pb::RaftRequest { id, request: Some(request) }.encode_to_vec());
        let Some(conn) = self.conn.as_mut() else {
            return Err(CallError::Unreachable(self.addr.clone()));
        };
        let exchange = async {
            conn.send(frame).await.map_err(|e| CallError::Network(e.to_string()))?;
            loop {
                let frame = match conn.next().await {
                    Some(Ok(f)) => f,
                    Some(Err(e)) => return Err(CallError::Network(e.to_string())),
                    None => return Err(CallError::Network("connection closed by peer".into())),
                };
                let resp = pb::RaftResponse::decode(frame.freeze())
                    .map_err(|e| CallError::Network(format!("undecodable response: {e}")))?;
                if resp.id == id {
                    return match resp.response {
                        Some(Response::Error(e)) => Err(CallError::Remote(e)),
                        Some(r) => Ok(r),
                        None => Err(CallError::Network("empty response".into())),
                    };
                }
                // An answer to an earlier, abandoned request: skip it.
            }
        };
        let result = match tokio::time::timeout(ttl, exchange).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(ttl)),
        };
        if matches!(result, Err(CallError::Network(_) | CallError::Timeout(_))) {
            self.conn = None;
        }
        result
    }

    fn rpc_error(&self, e: CallError, action: RPCTypes) -> RPCError<TypeConfig> {
        match e {
            CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::from_string(m)),
            CallError::Timeout(timeout) => {
                RPCError::Timeout(Timeout { action, id: self.node_id, target: self.target, timeout })
            }
            other => RPCError::Network(NetworkError::from_string(other.to_string())),
        }
    }

    fn stream_error(&self, e: CallError) -> StreamingError<TypeConfig> {
        match self.rpc_error(e, RPCTypes::InstallSnapshot) {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Timeout(t) => StreamingError::Timeout(t),
            RPCError::Network(n) => StreamingError::Network(n),
            RPCError::RemoteError(r) => StreamingError::Network(NetworkError::from_string(r.to_string())),
        }
    }

    async fn vote_call(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        pre: bool,
        ttl: Duration,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = vote_request_to_pb(&rpc);
        let request = if pre { Request::PreVote(req) } else { Request::Vote(req) };
        match self.call(request, ttl).await {
            Ok(Response::Vote(v)) => {
                vote_response_from_pb(&v).map_err(|e| self.rpc_error(e.into(), RPCTypes::Vote))
            }
            Ok(other) => Err(self.rpc_error(unexpected(&other), RPCTypes::Vote)),
            Err(e) => Err(self.rpc_error(e, RPCTypes::Vote)),
        }
    }
}

fn unexpected(r: &Response) -> CallError {
    CallError::Network(format!("unexpected response kind: {r:?}").chars().take(200).collect())
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = Bytes;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = pb::AppendEntriesRequest {
            vote: Some(convert::vote_to_pb(&rpc.vote)),
            prev_log_id: convert::opt_log_id_to_pb(&rpc.prev_log_id),
            entries: rpc.entries.iter().map(convert::entry_to_pb).collect(),
            leader_commit: convert::opt_log_id_to_pb(&rpc.leader_commit),
        };
        let sent = Instant::now();
        match self.call(Request::AppendEntries(req), option.hard_ttl()).await {
            Ok(Response::AppendEntries(r)) => {
                if let Some(h) = self.latency.as_ref().filter(|_| !rpc.entries.is_empty()) {
                    h.record(sent.elapsed());
                }
                append_response_from_pb(&r).map_err(|e| self.rpc_error(e.into(), RPCTypes::AppendEntries))
            }
            Ok(other) => Err(self.rpc_error(unexpected(&other), RPCTypes::AppendEntries)),
            Err(e) => Err(self.rpc_error(e, RPCTypes::AppendEntries)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_call(rpc, false, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_call(rpc, true, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let send = async {
            let meta = convert::snapshot_meta_to_pb(&snapshot.meta);
            let data = &snapshot.snapshot;
            let mut offset = 0;
            loop {
                let end = (offset + SNAPSHOT_CHUNK).min(data.len());
                let done = end == data.len();
                let chunk = pb::SnapshotChunk {
                    vote: Some(convert::vote_to_pb(&vote)),
                    meta: Some(meta.clone()),
                    offset: offset as u64,
                    data: data.slice(offset..end),
                    done,
                };
                let ttl = if done {
                    SNAPSHOT_INSTALL_TIMEOUT
                } else {
                    option.hard_ttl().max(Duration::from_secs(5))
                };
                let resp = match self.call(Request::SnapshotChunk(chunk), ttl).await {
                    Ok(Response::Snapshot(r)) => r,
                    Ok(other) => return Err(self.stream_error(unexpected(&other))),
                    Err(e) => return Err(self.stream_error(e)),
                };
                if done {
                    let v = convert::req_vote(&resp.vote, "SnapshotResponse.vote")
                        .map_err(|e| self.stream_error(e.into()))?;
                    return Ok(SnapshotResponse::new(v));
                }
                offset = end;
            }
        };
        tokio::select! {
            r = send => r,
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let pb_req = pb::TransferLeaderRequest {
            from_leader: Some(convert::vote_to_pb(req.from_leader())),
            to_node_id: *req.to_node_id(),
            last_log_id: req.last_log_id().map(convert::log_id_to_pb),
        };
        match self.call(Request::TransferLeader(pb_req), option.hard_ttl()).await {
            Ok(Response::TransferLeader(r)) => {
                transfer_response_from_pb(&r).map_err(|e| self.rpc_error(e.into(), RPCTypes::TransferLeader))
            }
            Ok(other) => Err(self.rpc_error(unexpected(&other), RPCTypes::TransferLeader)),
            Err(e) => Err(self.rpc_error(e, RPCTypes::TransferLeader)),
        }
    }
}

// ---------------------------------------------------------------- message conversions

pub(crate) fn vote_request_to_pb(r: &VoteRequest<TypeConfig>) -> pb::VoteRequest {
    pb::VoteRequest {
        vote: Some(convert::vote_to_pb(&r.vote)),
        last_log_id: convert::opt_log_id_to_pb(&r.last_log_id),
        leadership_transfer: r.leadership_transfer,
    }
}

pub(crate) fn vote_request_from_pb(r: &pb::VoteRequest) -> Result<VoteRequest<TypeConfig>, ConvertError> {
    let mut req = VoteRequest::new(
        convert::req_vote(&r.vote, "VoteRequest.vote")?,
        convert::opt_log_id_from_pb(&r.last_log_id)?,
    );
    req.leadership_transfer = r.leadership_transfer;
    Ok(req)
}

pub(crate) fn vote_response_to_pb(r: &VoteResponse<TypeConfig>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(convert::vote_to_pb(&r.vote)),
        vote_granted: r.vote_granted,
        last_log_id: convert::opt_log_id_to_pb(&r.last_log_id),
    }
}

fn vote_response_from_pb(r: &pb::VoteResponse) -> Result<VoteResponse<TypeConfig>, ConvertError> {
    Ok(VoteResponse::new(
        convert::req_vote(&r.vote, "VoteResponse.vote")?,
        convert::opt_log_id_from_pb(&r.last_log_id)?,
        r.vote_granted,
    ))
}

pub(crate) fn append_response_to_pb(r: &AppendEntriesResponse<TypeConfig>) -> pb::AppendEntriesResponse {
    use pb::append_entries_response::Result as R;
    let result = match r {
        AppendEntriesResponse::Success => R::Success(pb::Blank {}),
        AppendEntriesResponse::PartialSuccess(l) => {
            R::PartialSuccess(pb::PartialSuccess { matching: convert::opt_log_id_to_pb(l) })
        }
        AppendEntriesResponse::Conflict => R::Conflict(pb::Blank {}),
        AppendEntriesResponse::HigherVote(v) => R::HigherVote(convert::vote_to_pb(v)),
    };
    pb::AppendEntriesResponse { result: Some(result) }
}

fn append_response_from_pb(
    r: &pb::AppendEntriesResponse,
) -> Result<AppendEntriesResponse<TypeConfig>, ConvertError> {
    use pb::append_entries_response::Result as R;
    Ok(match r.result.as_ref().ok_or(ConvertError::Missing("AppendEntriesResponse.result"))? {
        R::Success(_) => AppendEntriesResponse::Success,
        R::PartialSuccess(p) => {
            AppendEntriesResponse::PartialSuccess(convert::opt_log_id_from_pb(&p.matching)?)
        }
        R::Conflict(_) => AppendEntriesResponse::Conflict,
        R::HigherVote(v) => AppendEntriesResponse::HigherVote(convert::vote_from_pb(v)?),
    })
}

pub(crate) fn transfer_response_to_pb(r: &TransferLeaderResponse<TypeConfig>) -> pb::TransferLeaderResponse {
    use openraft::raft::TransferLeaderError as E;
    use pb::transfer_leader_response::Result as R;
    let result = match r {
        Ok(()) => R::Ok(pb::Blank {}),
        Err(E::VoteChanged { expected, actual }) => R::VoteChanged(pb::VoteChanged {
            expected: Some(convert::vote_to_pb(expected)),
            actual: Some(convert::vote_to_pb(actual)),
        }),
        Err(E::LogNotFlushed { expected, actual }) => R::LogNotFlushed(pb::LogNotFlushed {
            expected: convert::opt_log_id_to_pb(expected),
            actual: convert::opt_log_id_to_pb(actual),
        }),
    };
    pb::TransferLeaderResponse { result: Some(result) }
}

fn transfer_response_from_pb(
    r: &pb::TransferLeaderResponse,
) -> Result<TransferLeaderResponse<TypeConfig>, ConvertError> {
    use openraft::raft::TransferLeaderError as E;
    use pb::transfer_leader_response::Result as R;
    Ok(match r.result.as_ref().ok_or(ConvertError::Missing("TransferLeaderResponse.result"))? {
        R::Ok(_) => Ok(()),
        R::VoteChanged(v) => Err(E::VoteChanged {
            expected: convert::req_vote(&v.expected, "VoteChanged.expected")?,
            actual: convert::req_vote(&v.actual, "VoteChanged.actual")?,
        }),
        R::LogNotFlushed(l) => Err(E::LogNotFlushed {
            expected: convert::opt_log_id_from_pb(&l.expected)?,
            actual: convert::opt_log_id_from_pb(&l.actual)?,
        }),
    })
}
