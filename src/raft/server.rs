//! The server side of the cluster transport: accepts peer connections (TLS
//! handshake first when configured: a peer without a certificate from the
//! cluster CA never gets past it), reads `raft.RaftRequest` frames, hands each
//! to the local openraft node and writes the `raft.RaftResponse`. Requests on
//! one connection are served one at a time, in order; connections are capped.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest};
use prost::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::convert::{self, ConvertError};
use super::network::{self, framed, Io};
use super::pb;
use super::pb::raft_request::Request;
use super::pb::raft_response::Response;
use super::tls::ClusterTls;
use super::types::{Raft, Snapshot};

/// Peer connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest snapshot a peer may stream to us.
const MAX_SNAPSHOT: usize = 4 * 1024 * 1024 * 1024;

/// Serves until `stop` turns true (or its sender is dropped).
pub(crate) async fn serve(
    listener: TcpListener,
    raft: Raft,
    tls: Option<ClusterTls>,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "cluster accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let raft = raft.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_conn(tcp, raft, tls, stop).await {
                tracing::debug!(%peer, error = %e, "cluster connection ended");
            }
        });
    }
}

#[derive(thiserror::Error, Debug)]
enum ConnError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("tls handshake timed out")]
    HandshakeTimeout,
    #[error("undecodable request: {0}")]
    Decode(#[from] prost::DecodeError),
}

async fn serve_conn(
    tcp: TcpStream,
    raft: Raft,
    tls: Option<ClusterTls>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = match &tls {
        None => Box::new(tcp),
        Some(tls) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(tcp)).await {
            Ok(stream) => Box::new(stream?),
            Err(_) => return Err(ConnError::HandshakeTimeout),
        },
    };
    let mut conn = framed(io);
    let mut snapshot = SnapshotReceiver::default();
    loop {
        let frame = tokio::select! {
            f = conn.next() => f,
            _ = stop.changed() => return Ok(()),
        };
        let frame = match frame {
            Some(f) => f?,
            None => return Ok(()),
        };
        let req = pb::RaftRequest::decode(frame.freeze())?;
        let response = match req.request {
            Some(r) => handle(&raft, r, &mut snapshot).await,
            None => Response::Error("empty request".into()),
        };
        let out = pb::RaftResponse { id: req.id, response: Some(response) };
        conn.send(Bytes::from(out.encode_to_vec())).await?;
    }
}

/// Reassembles one snapshot from its chunks.
#[derive(Default)]
struct SnapshotReceiver {
    buf: BytesMut,
}

async fn handle(raft: &Raft, req: Request, snapshot: &mut SnapshotReceiver) -> Response {
    match dispatch(raft, req, snapshot).await {
        Ok(r) => r,
        Err(e) => Response::Error(e),
    }
}

fn bad(e: ConvertError) -> String {
    format!("invalid request: {e}")
}

async fn dispatch(raft: &Raft, req: Request, snapshot: &mut SnapshotReceiver) -> Result<Response, String> {
    match req {
        Request::AppendEntries(r) => {
            let entries = r.entries.into_iter().map(convert::entry_from_pb).collect::<Result<Vec<_>, _>>();
            let rpc = AppendEntriesRequest {
                vote: convert::req_vote(&r.vote, "AppendEntriesRequest.vote").map_err(bad)?,
                prev_log_id: convert::opt_log_id_from_pb(&r.prev_log_id).map_err(bad)?,
                entries: entries.map_err(bad)?,
                leader_commit: convert::opt_log_id_from_pb(&r.leader_commit).map_err(bad)?,
            };
            let resp = raft.append_entries(rpc).await.map_err(|e| e.to_string())?;
            Ok(Response::AppendEntries(network::append_response_to_pb(&resp)))
        }
        Request::Vote(r) => {
            let rpc = network::vote_request_from_pb(&r).map_err(bad)?;
            let resp = raft.vote(rpc).await.map_err(|e| e.to_string())?;
            Ok(Response::Vote(network::vote_response_to_pb(&resp)))
        }
        Request::PreVote(r) => {
            let rpc = network::vote_request_from_pb(&r).map_err(bad)?;
            let resp = raft.pre_vote(rpc).await.map_err(|e| e.to_string())?;
            Ok(Response::Vote(network::vote_response_to_pb(&resp)))
        }
        Request::SnapshotChunk(c) => {
            if c.offset == 0 {
                snapshot.buf.clear();
            }
            if c.offset != snapshot.buf.len() as u64 {
                snapshot.buf.clear();
                return Err(format!(
                    "snapshot chunk at offset {} but {} bytes received",
                    c.offset,
                    snapshot.buf.len()
                ));
            }
            if snapshot.buf.len() + c.data.len() > MAX_SNAPSHOT {
                snapshot.buf.clear();
                return Err("snapshot too large".into());
            }
            snapshot.buf.extend_from_slice(&c.data);
            if !c.done {
                return Ok(Response::Snapshot(pb::SnapshotResponse { vote: None }));
            }
            let data = std::mem::take(&mut snapshot.buf).freeze();
            let vote = convert::req_vote(&c.vote, "SnapshotChunk.vote").map_err(bad)?;
            let meta = c.meta.as_ref().ok_or_else(|| bad(ConvertError::Missing("SnapshotChunk.meta")))?;
            let meta = convert::snapshot_meta_from_pb(meta).map_err(bad)?;
            let resp = raft
                .install_full_snapshot(vote, Snapshot { meta, snapshot: data })
                .await
                .map_err(|e| e.to_string())?;
            Ok(Response::Snapshot(pb::SnapshotResponse { vote: Some(convert::vote_to_pb(&resp.vote)) }))
        }
        Request::TransferLeader(r) => {
            let from = convert::req_vote(&r.from_leader, "TransferLeaderRequest.from_leader").map_err(bad)?;
            let last = convert::opt_log_id_from_pb(&r.last_log_id).map_err(bad)?;
            let rpc = TransferLeaderRequest::new(from, r.to_node_id, last);
            let resp = raft.handle_transfer_leader(rpc).await.map_err(|e| e.to_string())?;
            Ok(Response::TransferLeader(network::transfer_response_to_pb(&resp)))
        }
    }
}
