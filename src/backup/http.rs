//! The backup routes (under `/api/v1`, behind the admin token check) and the
//! streaming HTTP client that `ctl backup` and peer requests use.
//!
//! - `POST /backups`: starts an export on this node: 202 `{id, job}`; 409
//!   while another backup or restore runs in the cluster (the error names
//!   it); 507 when the disk is too full.
//! - `GET /backups`: every node's backups (`?local=true`: this node's only);
//!   unreachable nodes are listed in `unreachable`.
//! - `GET /backups/{id}`: manifest, file and job (a restore job's id too).
//! - `GET /backups/{id}/file`: the file, streamed.
//! - `POST /backups/upload`: a file, streamed to disk, validated, stored
//!   under a new id: 201 `{id, manifest}`; 400 with what is wrong.
//! - `POST /backups/{id}/restore` `{"mode": "merge"|"replace"}`: validates,
//!   then restores through the log: 202 `{id: job id}`; poll `GET /backups/{job id}`.
//! - `DELETE /backups/{id}`.
//! - `GET /state/digest`: this replica's state digests.
//!
//! A backup lives on the node that wrote (or received) it: asked about an id
//! it does not hold, a node redirects (307) to the node that does.
//! `POST /backups/internal/propose` (protobuf `state.Batch` body) lets a
//! follower's job propose through the leader.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::Method;
use hyper_util::rt::TokioIo;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::restore::Mode;
use super::{format, BackupDetail, BackupError, BackupInfo, BackupService, ManifestJson};
use crate::admin::cluster::ErrorBody;
use crate::admin::API_PREFIX;
use crate::state::pb as spb;

/// Peers' answers are awaited this long.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// A forwarded proposal waits this long.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// `POST /backups` and `/restore` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub id: String,
    pub node_id: u64,
}

/// `GET /backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupList {
    pub backups: Vec<BackupInfo>,
    #[serde(default)]
    pub unreachable: Vec<u64>,
}

/// `POST /backups/upload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    pub id: String,
    pub node_id: u64,
    pub manifest: ManifestJson,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RestoreRequest {
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    #[serde(default)]
    local: bool,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<BackupError> for ApiError {
    fn from(e: BackupError) -> ApiError {
        let status = match &e {
            BackupError::Busy(_) | BackupError::Refused(_) => StatusCode::CONFLICT,
            BackupError::Disk { .. } => StatusCode::INSUFFICIENT_STORAGE,
            BackupError::NotFound(_) => StatusCode::NOT_FOUND,
            BackupError::Format(_) => StatusCode::BAD_REQUEST,
            BackupError::Raft(_) | BackupError::NoLeader(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

type ApiResult = Result<Response, ApiError>;

/// The routes, with their state applied (merged into the admin API router).
pub fn routes(svc: BackupService) -> Router {
    Router::new()
        .route("/backups", post(create).get(list))
        .route("/backups/upload", post(upload))
        .route(
            "/backups/internal/propose",
            post(internal_propose).layer(DefaultBodyLimit::max(crate::raft::MAX_ENTRY_BYTES)),
        )
        .route("/backups/{id}", get(inspect).delete(delete))
        .route("/backups/{id}/file", get(download))
        .route("/backups/{id}/restore", post(restore))
        .route("/state/digest", get(digest))
        .with_state(svc)
}

async fn create(State(svc): State<BackupService>) -> ApiResult {
    let id = svc.start_export().await?;
    Ok((StatusCode::ACCEPTED, Json(Started { id, node_id: svc.node_id() })).into_response())
}

async fn list(State(svc): State<BackupService>, Query(q): Query<ListQuery>) -> ApiResult {
    let local = svc.clone();
    let mut backups = tokio::task::spawn_blocking(move || local.list_local())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut unreachable = Vec::new();
    if !q.local {
        for (id, addr, _) in svc.members() {
            if id == svc.node_id() {
                continue;
            }
            match peer_list(&svc, &addr.admin_addr).await {
                Some(mut l) => backups.append(&mut l),
                None => unreachable.push(id),
            }
        }
    }
    backups.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    Ok(Json(BackupList { backups, unreachable }).into_response())
}

async fn peer_list(svc: &BackupService, admin_addr: &str) -> Option<Vec<BackupInfo>> {
    let path = format!("{API_PREFIX}/backups?local=true");
    let resp =
        crate::admin::client::request(admin_addr, Method::GET, &path, svc.token(), &[], None, PEER_TIMEOUT)
            .await
            .ok()?;
    if resp.status != 200 {
        return None;
    }
    serde_json::from_slice::<BackupList>(&resp.body).ok().map(|l| l.backups)
}

/// 307 to the node holding backup `id`, or 404.
async fn redirect_to_holder(svc: &BackupService, id: &str, suffix: &str) -> ApiResult {
    for (node, addr, _) in svc.members() {
        if node == svc.node_id() {
            continue;
        }
        if let Some(list) = peer_list(svc, &addr.admin_addr).await {
            if list.iter().any(|b| b.id == id) {
                let location = format!("http://{}{API_PREFIX}/backups/{id}{suffix}", addr.admin_addr);
                return Ok((StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response());
            }
        }
    }
    Err(ApiError(StatusCode::NOT_FOUND, format!("no backup {id} on any reachable node")))
}

async fn inspect(State(svc): State<BackupService>, UrlPath(id): UrlPath<String>) -> ApiResult {
    let job = svc.job(&id);
    let file = svc.path_of(&id);
    if file.is_none() && job.is_none() {
        return redirect_to_holder(&svc, &id, "").await;
    }
    let (info, manifest) = match &file {
        Some(p) => {
            let p2 = p.clone();
            let m = tokio::task::spawn_blocking(move || format::read_manifest(&p2))
                .await
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            let info = svc.list_local().into_iter().find(|b| b.id == id);
            (info, m.ok().as_ref().map(ManifestJson::from))
        }
        None => (None, None),
    };
    Ok(Json(BackupDetail { info, manifest, job }).into_response())
}

async fn delete(State(svc): State<BackupService>, UrlPath(id): UrlPath<String>) -> ApiResult {
    if svc.path_of(&id).is_none() {
        return redirect_to_holder(&svc, &id, "").await;
    }
    svc.delete(&id)?;
    Ok(Json(Started { id, node_id: svc.node_id() }).into_response())
}

async fn download(State(svc): State<BackupService>, UrlPath(id): UrlPath<String>) -> ApiResult {
    let Some(path) = svc.path_of(&id) else {
        return redirect_to_holder(&svc, &id, "/file").await;
    };
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}", path.display())))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let disposition = format!("attachment; filename=\"{}\"", super::file_name(&id));
    Ok((
        [
            (header::CONTENT_TYPE, "application/gzip".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

async fn upload(State(svc): State<BackupService>, headers: HeaderMap, body: Body) -> ApiResult {
    let len: u64 = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    super::check_disk(svc.dir(), len)?;
    let id = super::id_for(super::now_ms());
    if svc.path_of(&id).is_some() {
        return Err(ApiError(StatusCode::CONFLICT, format!("backup {id} exists; retry")));
    }
    let tmp = svc.dir().join(format!(".upload-{id}.partial"));
    let result = receive(&tmp, body).await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("upload failed: {e}")));
    }
    let t2 = tmp.clone();
    let validated = tokio::task::spawn_blocking(move || format::validate(&t2))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let manifest = match validated {
        Ok(m) => m,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ApiError(StatusCode::BAD_REQUEST, format!("refused: {e}")));
        }
    };
    let dest = svc.dir().join(super::file_name(&id));
    tokio::fs::rename(&tmp, &dest)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let out = Uploaded { id, node_id: svc.node_id(), manifest: ManifestJson::from(&manifest) };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn receive(path: &Path, body: Body) -> Result<(), String> {
    let mut f = tokio::fs::File::create(path).await.map_err(|e| e.to_string())?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        f.write_all(&chunk).await.map_err(|e| e.to_string())?;
    }
    f.sync_all().await.map_err(|e| e.to_string())
}

async fn restore(State(svc): State<BackupService>, UrlPath(id): UrlPath<String>, body: Bytes) -> ApiResult {
    let req: RestoreRequest = if body.is_empty() {
        RestoreRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?
    };
    let mode = match req.mode.as_deref() {
        None => Mode::Merge,
        Some(m) => Mode::parse(m).ok_or_else(|| {
            ApiError(StatusCode::BAD_REQUEST, format!("mode {m:?}: expected \"merge\" or \"replace\""))
        })?,
    };
    let Some(path) = svc.path_of(&id) else {
        return redirect_to_holder(&svc, &id, "/restore").await;
    };
    let job = svc.start_restore(path, &id, mode).await?;
    Ok((StatusCode::ACCEPTED, Json(Started { id: job, node_id: svc.node_id() })).into_response())
}

async fn digest(State(svc): State<BackupService>) -> ApiResult {
    // Encodes the whole state: off the async workers.
    let d = tokio::task::spawn_blocking(move || svc.digest())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(d).into_response())
}

async fn internal_propose(State(svc): State<BackupService>, body: Bytes) -> ApiResult {
    let batch = spb::Batch::decode(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid batch: {e}")))?;
    // Only what backup jobs propose: this route is no general way into the log.
    use spb::command::Cmd;
    let allowed = |c: &spb::Command| {
        matches!(
            c.cmd,
            Some(
                Cmd::JobLock(_)
                    | Cmd::JobRelease(_)
                    | Cmd::RestoreBegin(_)
                    | Cmd::RestoreChunk(_)
                    | Cmd::RestoreEnd(_)
            )
        )
    };
    if !batch.commands.iter().all(allowed) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "only backup and restore commands are accepted".into(),
        ));
    }
    if !svc.raft().is_leader() {
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "not the leader".into()));
    }
    let results = match svc.raft().propose(&batch).await {
        Ok(r) => r,
        Err(e @ crate::raft::RaftError::ForwardToLeader { .. }) => {
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
        }
        Err(e) => return Err(BackupError::from(e).into()),
    };
    Ok(Json(super::results_to_errors(results)).into_response())
}

/// Proposes through the leader's admin API (this node is not the leader).
pub(super) async fn propose_via_leader(
    svc: &BackupService,
    batch: &spb::Batch,
) -> Result<Vec<Option<String>>, BackupError> {
    let m = svc.raft().metrics();
    let addr = m
        .leader_addr
        .as_ref()
        .filter(|_| m.leader != Some(m.node_id))
        .ok_or_else(|| BackupError::NoLeader("no leader is known".into()))?;
    let path = format!("{API_PREFIX}/backups/internal/propose");
    let resp = crate::admin::client::request(
        &addr.admin_addr,
        Method::POST,
        &path,
        svc.token(),
        &[],
        Some(Bytes::from(batch.encode_to_vec())),
        PROPOSE_TIMEOUT,
    )
    .await
    .map_err(|e| match e {
        // Not sent: safe to try again (the leader may be changing).
        crate::admin::client::ClientError::Connect { .. } => {
            BackupError::NoLeader(format!("proposing through the leader: {e}"))
        }
        // Sent, outcome unknown: never proposed twice.
        e => BackupError::Other(format!("proposing through the leader (outcome unknown): {e}")),
    })?;
    if resp.status == 503 {
        return Err(BackupError::NoLeader(String::from_utf8_lossy(&resp.body).to_string()));
    }
    if resp.status != 200 {
        let msg = serde_json::from_slice::<ErrorBody>(&resp.body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&resp.body).to_string());
        return Err(BackupError::Other(format!("the leader refused the proposal: {msg}")));
    }
    serde_json::from_slice(&resp.body).map_err(|e| BackupError::Other(format!("leader's answer: {e}")))
}

// ------------------------------------------------------------ streaming client

/// A request body for [`send`].
pub enum SendBody {
    Empty,
    Json(String),
    /// A file, streamed; `progress` is called with the bytes sent so far.
    File(PathBuf, Box<dyn Fn(u64) + Send + Sync>),
}

#[derive(thiserror::Error, Debug)]
pub enum SendError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("HTTP exchange with {addr} failed: {message}")]
    Http { addr: String, message: String },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
}

type Incoming = hyper::Response<hyper::body::Incoming>;

/// One request; follows up to two redirects (a backup held by another
/// node). `authority` is `host:port`; `path` starts with `/`. Returns the
/// answer and the authority that gave it.
pub async fn send(
    authority: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: SendBody,
    timeout: Duration,
) -> Result<(Incoming, String), SendError> {
    let mut authority = authority.to_string();
    let mut path = path.to_string();
    // A JSON body is sent again after a redirect; a file is not (uploads
    // are never redirected).
    let json = match &body {
        SendBody::Json(s) => Some(s.clone()),
        _ => None,
    };
    let mut body = Some(body);
    for _ in 0..3 {
        let b = body.take().or_else(|| json.clone().map(SendBody::Json)).unwrap_or(SendBody::Empty);
        let resp = tokio::time::timeout(timeout, send_once(&authority, method.clone(), &path, token, b))
            .await
            .map_err(|_| SendError::Timeout { addr: authority.clone(), timeout })??;
        if resp.status() != StatusCode::TEMPORARY_REDIRECT {
            return Ok((resp, authority));
        }
        let Some(loc) = resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
            return Ok((resp, authority));
        };
        let rest = loc.strip_prefix("http://").unwrap_or(loc);
        let (a, p) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        authority = a.to_string();
        path = p.to_string();
    }
    Err(SendError::Http { addr: authority, message: "too many redirects".into() })
}

async fn send_once(
    authority: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: SendBody,
) -> Result<Incoming, SendError> {
    let http = |message: String| SendError::Http { addr: authority.to_string(), message };
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|source| SendError::Connect { addr: authority.to_string(), source })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| http(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut builder = hyper::Request::builder().method(method).uri(path).header(header::HOST, authority);
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body: http_body_util::combinators::BoxBody<Bytes, std::io::Error> = match body {
        SendBody::Empty => http_body_util::Empty::new().map_err(|never| match never {}).boxed(),
        SendBody::Json(s) => {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
            http_body_util::Full::new(Bytes::from(s)).map_err(|never| match never {}).boxed()
        }
        SendBody::File(p, progress) => {
            let f = tokio::fs::File::open(&p).await.map_err(|e| http(format!("{}: {e}", p.display())))?;
            let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
            builder = builder
                .header(header::CONTENT_TYPE, "application/gzip")
                .header(header::CONTENT_LENGTH, len.to_string());
            let mut sent = 0u64;
            let stream = tokio_util::io::ReaderStream::new(f).map(move |r| {
                r.map(|b| {
                    sent += b.len() as u64;
                    progress(sent);
                    hyper::body::Frame::data(b)
                })
            });
            BodyExt::boxed(http_body_util::StreamBody::new(stream))
        }
    };
    let req = builder.body(body).map_err(|e| http(e.to_string()))?;
    sender.send_request(req).await.map_err(|e| http(e.to_string()))
}

/// Reads a whole (small, JSON) response body.
pub async fn read_body(resp: Incoming, limit: usize) -> Result<Bytes, String> {
    http_body_util::Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string())
}
