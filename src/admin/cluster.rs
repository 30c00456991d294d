//! The cluster routes of the admin REST API (under `/api/v1`, token-checked
//! by the parent router):
//!
//! - `GET /cluster`: members with addresses, voter/learner, role, term,
//!   commit and applied index (each node's own report, fetched from its open
//!   `/health/leader`), matched index and lag (the leader's replication
//!   metrics), the leader, the mode and the pinned leader. A follower asks the
//!   leader (which knows the replication progress) and answers from its own
//!   view when the leader cannot be reached.
//! - `POST /cluster/nodes` `{id, cluster_addr, mqtt_addr, admin_addr, learner}`:
//!   adds the node as a learner, waits until it has caught up, then makes it a
//!   voter unless `learner` is true.
//! - `DELETE /cluster/nodes/{id}`: removes a voter or learner (and its pin).
//! - `POST /cluster/leader/transfer` `{node_id}`: moves leadership now.
//! - `POST /cluster/leader/pin` `{node_id}`, `DELETE /cluster/leader/pin`:
//!   record or clear the preferred leader in the log (see `raft::pin`).
//!
//! Requests that change the cluster must run on the leader: a follower
//! forwards them to the leader's admin address (with the caller's
//! Authorization header and an `x-raftmq-forwarded` mark, so a request is
//! forwarded at most once) and returns the leader's answer. Errors are JSON
//! `{"error": "..."}` with a status that says what went wrong.
//!
//! Must not touch: the State or the broker; everything goes through
//! [`RaftNode`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{client, AdminView, Mode};
use crate::raft::{NodeAddr, NodeId, NodeMetrics, RaftError, RaftNode, Role};
use crate::state::pb;

/// Marks a request forwarded by a follower (value: the follower's node id).
pub const FORWARDED_HEADER: &str = "x-raftmq-forwarded";
/// How long to wait for a peer's health report.
const PEER_TIMEOUT: Duration = Duration::from_millis(800);
/// How long a new node may take to catch up before `add-node` gives up.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a membership change may take to commit.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a leader transfer may take.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);
/// A forwarded request waits for the leader's answer at most this long
/// (longer than any operation above).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(100);

/// What the `/api/v1` handlers share.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub view: Arc<dyn AdminView>,
    /// None when the node runs no Raft (then the cluster routes answer 503).
    pub raft: Option<Arc<RaftNode>>,
}

impl axum::extract::FromRef<ApiState> for Arc<dyn AdminView> {
    fn from_ref(s: &ApiState) -> Self {
        s.view.clone()
    }
}

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/cluster", get(get_cluster))
        .route("/cluster/nodes", post(add_node))
        .route("/cluster/nodes/{id}", axum::routing::delete(remove_node))
        .route("/cluster/leader/transfer", post(transfer_leader))
        .route("/cluster/leader/pin", post(pin_leader).delete(unpin_leader))
        .route("/cluster/mode", get(get_mode).post(set_mode))
}

// ------------------------------------------------------------ JSON bodies

/// `GET /api/v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The node that built this view (the leader, unless it was unreachable).
    pub answered_by: NodeId,
    pub leader_id: Option<NodeId>,
    pub term: u64,
    pub mode: Mode,
    pub pinned_leader: Option<NodeId>,
    /// The answering node's last log index.
    pub last_log_index: Option<u64>,
    pub commit_index: Option<u64>,
    pub nodes: Vec<MemberInfo>,
}

/// One member in [`ClusterInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    pub cluster_addr: String,
    pub mqtt_addr: String,
    pub admin_addr: String,
    /// Voter (else a non-voting learner).
    pub voter: bool,
    /// This member is the leader (as the answering node knows).
    pub leader: bool,
    /// Whether the member answered its health check.
    pub reachable: bool,
    /// As the member reports it: "leader", "follower", "candidate", "learner".
    pub role: Option<String>,
    pub term: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// Leader only: last log index replicated to the member.
    pub matched_index: Option<u64>,
    /// Leader only: entries the member is behind the leader's log.
    pub lag: Option<u64>,
    /// Leader only: milliseconds since the member last acknowledged the leader.
    pub last_ack_ms: Option<u64>,
}

/// `POST /api/v1/cluster/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddNodeRequest {
    pub id: NodeId,
    pub cluster_addr: String,
    pub mqtt_addr: String,
    pub admin_addr: String,
    #[serde(default)]
    pub learner: bool,
}

/// `POST /api/v1/cluster/leader/transfer` and `/pin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdRequest {
    pub node_id: NodeId,
}

/// `GET|POST /api/v1/cluster/mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeInfo {
    pub mode: Mode,
}

/// Answer of the leader routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    pub leader_id: Option<NodeId>,
    pub pinned_leader: Option<NodeId>,
}

/// Every error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// An error answer: status + message.
#[derive(Debug)]
pub(crate) struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

pub(crate) fn err(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(status, msg.into())
}

impl From<RaftError> for ApiError {
    fn from(e: RaftError) -> ApiError {
        let status = match &e {
            RaftError::ForwardToLeader { .. } | RaftError::OutcomeUnknown { .. } => {
                return err(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("leadership changed during the request ({e}); retry"),
                )
            }
            RaftError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            RaftError::Config(_) | RaftError::State(_) => StatusCode::BAD_REQUEST,
            RaftError::Other(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        err(status, e.to_string())
    }
}

// ------------------------------------------------------------ forwarding

pub(crate) fn raft_of(st: &ApiState) -> Result<Arc<RaftNode>, ApiError> {
    st.raft.clone().ok_or_else(|| err(StatusCode::SERVICE_UNAVAILABLE, "this node runs no cluster"))
}

/// Where a request that needs the leader goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// This node is the leader: handle it here.
    Local,
    /// Forward to this admin address (the leader's).
    Forward { leader: NodeId, admin_addr: String },
}

/// Decides where a leader-only request goes (pure, for tests).
pub(crate) fn route(m: &NodeMetrics, already_forwarded: bool) -> Result<Route, ApiError> {
    if m.role == Role::Leader {
        return Ok(Route::Local);
    }
    if already_forwarded {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node {} got a forwarded request but is not the leader (leadership is changing); retry",
                m.node_id
            ),
        ));
    }
    match (m.leader, &m.leader_addr) {
        (Some(leader), Some(addr)) if leader != m.node_id => {
            Ok(Route::Forward { leader, admin_addr: addr.admin_addr.clone() })
        }
        _ => Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "no leader is known now (an election is running or there is no quorum); retry",
        )),
    }
}

/// Sends the request to the leader's admin port and relays its answer.
async fn forward(
    me: NodeId,
    leader: NodeId,
    admin_addr: &str,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // Handlers see the URI without the prefix the router was nested under.
    let path = format!("{}{}", super::API_PREFIX, uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut extra = vec![(FORWARDED_HEADER, me.to_string())];
    if let Some(auth) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        extra.push(("authorization", auth.to_string()));
    }
    let body = (!body.is_empty()).then_some(body);
    let resp = client::request(admin_addr, method, &path, None, &extra, body, FORWARD_TIMEOUT)
        .await
        .map_err(|e| err(StatusCode::BAD_GATEWAY, format!("cannot reach the leader (node {leader}): {e}")))?;
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp.content_type.unwrap_or_else(|| "application/json".into());
    Ok((status, [(header::CONTENT_TYPE, content_type)], resp.body).into_response())
}

/// Runs `f` on the leader: here if this node leads, else forwarded.
pub(crate) async fn on_leader<F, Fut>(
    st: &ApiState,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    f: F,
) -> Response
where
    F: FnOnce(Arc<RaftNode>, Bytes) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let result = async {
        let raft = raft_of(st)?;
        match route(&raft.metrics(), headers.contains_key(FORWARDED_HEADER))? {
            Route::Local => f(raft, body).await,
            Route::Forward { leader, admin_addr } => {
                forward(raft.id(), leader, &admin_addr, method, uri, headers, body).await
            }
        }
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| err(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

// ------------------------------------------------------------ GET /cluster

async fn get_cluster(State(st): State<ApiState>, uri: Uri, headers: HeaderMap) -> Response {
    let raft = match raft_of(&st) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    // Only the leader knows every member's replication progress: ask it.
    if let Ok(Route::Forward { leader, admin_addr }) =
        route(&raft.metrics(), headers.contains_key(FORWARDED_HEADER))
    {
        match forward(raft.id(), leader, &admin_addr, Method::GET, &uri, &headers, Bytes::new()).await {
            Ok(resp) => return resp,
            Err(e) => tracing::debug!(error = %e.1, "leader unreachable; answering /cluster locally"),
        }
    }
    Json(cluster_info(&raft).await).into_response()
}

/// What a peer's `/health/leader` body says (fields read leniently).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PeerHealth {
    role: Option<String>,
    term: Option<u64>,
    commit_index: Option<u64>,
    applied_index: Option<u64>,
}

async fn peer_health(admin_addr: String) -> Option<PeerHealth> {
    let resp = client::request(&admin_addr, Method::GET, "/health/leader", None, &[], None, PEER_TIMEOUT)
        .await
        .ok()?;
    serde_json::from_slice(&resp.body).ok()
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Leader => "leader",
        Role::Candidate => "candidate",
        Role::Follower => "follower",
        Role::Learner => "learner",
        Role::Shutdown => "shutdown",
    }
}

/// This node's view of the cluster, with each peer's own health report.
pub(crate) async fn cluster_info(raft: &RaftNode) -> ClusterInfo {
    let m = raft.metrics();
    let members = raft.members();
    let (pinned, mode) = {
        let state = raft.state().read();
        let s = state.cluster_settings();
        (s.pinned_leader, s.mode())
    };
    let peers = futures_util::future::join_all(members.iter().map(|p| {
        let fetch = p.id != m.node_id;
        let addr = p.addr.admin_addr.clone();
        async move {
            if fetch {
                peer_health(addr).await
            } else {
                None
            }
        }
    }))
    .await;
    let last = m.last_log_index;
    let nodes = members
        .iter()
        .zip(peers)
        .map(|(p, health)| {
            let me = p.id == m.node_id;
            let health = if me {
                Some(PeerHealth {
                    role: Some(role_name(m.role).to_string()),
                    term: Some(m.term),
                    commit_index: m.commit_index,
                    applied_index: m.applied_index,
                })
            } else {
                health
            };
            let reachable = health.is_some();
            let h = health.unwrap_or_default();
            MemberInfo {
                id: p.id,
                cluster_addr: p.addr.cluster_addr.clone(),
                mqtt_addr: p.addr.mqtt_addr.clone(),
                admin_addr: p.addr.admin_addr.clone(),
                voter: p.voter,
                leader: m.leader == Some(p.id),
                reachable,
                role: h.role,
                term: h.term,
                commit_index: h.commit_index,
                applied_index: h.applied_index,
                matched_index: p.matched,
                lag: p.matched.zip(last).map(|(matched, last)| last.saturating_sub(matched)),
                last_ack_ms: p.last_ack.map(|d| d.as_millis() as u64),
            }
        })
        .collect();
    ClusterInfo {
        answered_by: m.node_id,
        leader_id: m.leader,
        term: m.term,
        mode: match mode {
            pb::Mode::FullSync => Mode::FullSync,
            pb::Mode::DynsecSync => Mode::DynsecSync,
        },
        pinned_leader: pinned,
        last_log_index: last,
        commit_index: m.commit_index,
        nodes,
    }
}

// ------------------------------------------------------------ membership

async fn add_node(
    State(st): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    on_leader(&st, method, &uri, &headers, body, |raft, body| async move {
        let req: AddNodeRequest = parse(&body)?;
        if req.id == 0 {
            return Err(err(StatusCode::BAD_REQUEST, "node id must be at least 1"));
        }
        for (name, v) in
            [("cluster", &req.cluster_addr), ("mqtt", &req.mqtt_addr), ("admin", &req.admin_addr)]
        {
            if v.trim().is_empty() {
                return Err(err(StatusCode::BAD_REQUEST, format!("the {name} address is empty")));
            }
        }
        let m = raft.metrics();
        if m.voters.contains(&req.id) {
            return Err(err(StatusCode::CONFLICT, format!("node {} is already a voter", req.id)));
        }
        let addr = NodeAddr {
            cluster_addr: req.cluster_addr.clone(),
            mqtt_addr: req.mqtt_addr.clone(),
            admin_addr: req.admin_addr.clone(),
        };
        tracing::info!(node = req.id, ?addr, "adding a node as a learner");
        match tokio::time::timeout(CATCH_UP_TIMEOUT, raft.add_learner(req.id, addr, true)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(err(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "node {} is a learner now but did not catch up within {:?}: is it running (with \
                         join = true) and reachable at {}? It stays a learner; remove it or add it again",
                        req.id, CATCH_UP_TIMEOUT, req.cluster_addr
                    ),
                ))
            }
        }
        if !req.learner {
            let mut voters = raft.metrics().voters;
            voters.insert(req.id);
            tracing::info!(node = req.id, "the learner caught up: making it a voter");
            with_timeout(MEMBERSHIP_TIMEOUT, raft.change_membership(voters, false)).await?;
        }
        Ok(Json(cluster_info(&raft).await).into_response())
    })
    .await
}

async fn with_timeout<T>(
    t: Duration,
    f: impl std::future::Future<Output = Result<T, RaftError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(t, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ApiError::from(RaftError::Timeout(t))),
    }
}

async fn remove_node(
    State(st): State<ApiState>,
    Path(id): Path<NodeId>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    on_leader(&st, method, &uri, &headers, body, |raft, _| async move {
        let m = raft.metrics();
        if !m.voters.contains(&id) && !m.learners.contains(&id) {
            return Err(err(StatusCode::NOT_FOUND, format!("node {id} is not a member")));
        }
        if m.voters.len() == 1 && m.voters.contains(&id) {
            return Err(err(
                StatusCode::BAD_REQUEST,
                format!("node {id} is the last voter; it cannot be removed"),
            ));
        }
        tracing::info!(node = id, "removing a node");
        with_timeout(MEMBERSHIP_TIMEOUT, raft.remove_node(id)).await?;
        if raft.pinned_leader() == Some(id) {
            // A pin on a node that is gone would only confuse: drop it.
            if let Err(e) = with_timeout(MEMBERSHIP_TIMEOUT, raft.pin_leader(None)).await {
                tracing::warn!(error = %e.1, "could not clear the pin of the removed node");
            }
        }
        Ok(Json(cluster_info(&raft).await).into_response())
    })
    .await
}

// ------------------------------------------------------------ leadership

fn require_voter(m: &NodeMetrics, id: NodeId) -> Result<(), ApiError> {
    if m.voters.contains(&id) {
        Ok(())
    } else if m.learners.contains(&id) {
        Err(err(StatusCode::BAD_REQUEST, format!("node {id} is a learner; only a voter can lead")))
    } else {
        Err(err(StatusCode::NOT_FOUND, format!("node {id} is not a member")))
    }
}

async fn transfer_leader(
    State(st): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    on_leader(&st, method, &uri, &headers, body, |raft, body| async move {
        let req: NodeIdRequest = parse(&body)?;
        let m = raft.metrics();
        require_voter(&m, req.node_id)?;
        let pinned = raft.pinned_leader();
        if let Some(p) = pinned.filter(|p| *p != req.node_id) {
            return Err(err(
                StatusCode::CONFLICT,
                format!("leadership is pinned to node {p} and would move back; unpin first"),
            ));
        }
        if req.node_id != m.node_id {
            crate::raft::pin::ready_to_lead(&m, &raft.members(), req.node_id)
                .map_err(|e| err(StatusCode::CONFLICT, format!("{e}: not transferring (try again later)")))?;
            tracing::info!(to = req.node_id, "leader transfer requested");
            raft.transfer_leader(req.node_id).await?;
            raft.wait_for(TRANSFER_TIMEOUT, |m| m.leader == Some(req.node_id)).await?;
        }
        Ok(Json(LeaderInfo { leader_id: Some(req.node_id), pinned_leader: pinned }).into_response())
    })
    .await
}

async fn pin_leader(
    State(st): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    on_leader(&st, method, &uri, &headers, body, |raft, body| async move {
        let req: NodeIdRequest = parse(&body)?;
        require_voter(&raft.metrics(), req.node_id)?;
        with_timeout(MEMBERSHIP_TIMEOUT, raft.pin_leader(Some(req.node_id))).await?;
        tracing::info!(node = req.node_id, "leadership pinned");
        let leader_id = raft.metrics().leader;
        Ok(Json(LeaderInfo { leader_id, pinned_leader: Some(req.node_id) }).into_response())
    })
    .await
}

async fn unpin_leader(
    State(st): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    on_leader(&st, method, &uri, &headers, body, |raft, _| async move {
        with_timeout(MEMBERSHIP_TIMEOUT, raft.pin_leader(None)).await?;
        tracing::info!("leadership unpinned");
        let leader_id = raft.metrics().leader;
        Ok(Json(LeaderInfo { leader_id, pinned_leader: None }).into_response())
    })
    .await
}

// ------------------------------------------------------------ mode

fn mode_of(raft: &RaftNode) -> Mode {
    if raft.cluster_settings().mode == pb::Mode::DynsecSync as i32 {
        Mode::DynsecSync
    } else {
        Mode::FullSync
    }
}

async fn get_mode(State(st): State<ApiState>) -> Response {
    match raft_of(&st) {
        Ok(raft) => Json(ModeInfo { mode: mode_of(&raft) }).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Switches the mode (src/modes.rs says what happens to sessions).
async fn set_mode(
    State(st): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    on_leader(&st, method, &uri, &headers, body, |raft, body| async move {
        let req: ModeInfo = parse(&body)?;
        if req.mode == Mode::DynsecSync && raft.members().len() < 2 {
            // A single node has no local group to serve from (src/modes.rs),
            // and active-active needs more than one node anyway.
            return Err(err(StatusCode::CONFLICT, "dynsec-sync needs a cluster of several nodes"));
        }
        let mode = match req.mode {
            Mode::FullSync => pb::Mode::FullSync,
            Mode::DynsecSync => pb::Mode::DynsecSync,
        };
        let cmd = pb::Command { cmd: Some(pb::command::Cmd::SetMode(pb::SetMode { mode: mode as i32 })) };
        with_timeout(MEMBERSHIP_TIMEOUT, raft.apply_command(cmd)).await?;
        tracing::info!(mode = ?req.mode, "cluster mode set");
        Ok(Json(ModeInfo { mode: mode_of(&raft) }).into_response())
    })
    .await
}
