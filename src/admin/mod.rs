//! The admin HTTP server: health checks, Prometheus metrics and the REST API.
//!
//! Owns: the `[admin]` configuration ([`AdminConfig`]), the routes
//! - `GET /health/live`: 200 "ok" while the process runs;
//! - `GET /health/ready`: 200 when [`NodeStatus::ready`], else 503 (JSON status);
//! - `GET /health/leader`: 200 only on the serving leader, else 503 (JSON status);
//!   what HAProxy / keepalived / Kubernetes probes check (DESIGN.md "Health endpoints");
//! - `GET /metrics`: Prometheus text exposition 0.0.4;
//! - `GET /api/v1/status`: JSON status; every `/api/v1` route needs
//!   `Authorization: Bearer <token>` when a token is configured (401 otherwise);
//! - `/api/v1/cluster...`: members, leader transfer and pinning ([`cluster`]),
//!   served through the node's [`RaftNode`]; requests that need the leader are
//!   forwarded to it;
//! - `/api/v1/dynsec...`: dynamic-security init, import and export ([`dynsec`]);
//!
//! and the [`AdminView`] trait through which it reads the node.
//!
//! Must not touch: the broker or the state directly. It only calls [`AdminView`],
//! which the node implements, and [`RaftNode`]; later `/api/v1` routes are
//! added in [`api_routes`] and inherit the token check. [`client`] is the small
//! HTTP client used for forwarding and by `raftmq ctl`.

pub mod client;
pub mod cluster;
pub mod dynsec;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::raft::RaftNode;
use cluster::{ApiState, ErrorBody};

/// Where the REST API lives.
pub const API_PREFIX: &str = "/api/v1";

/// Content type of the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Raft role of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
}

/// Replication mode of the cluster (DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    FullSync,
    DynsecSync,
}

/// What the health endpoints and `/api/v1/status` report. Serialized as JSON with
/// these field names (`role` lowercase, `mode` "full-sync" / "dynsec-sync").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub role: Role,
    pub leader_id: Option<u64>,
    /// MQTT address clients should use for the leader (host:port), when known.
    pub leader_mqtt_addr: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub mode: Mode,
    /// This node accepts MQTT clients now.
    pub serving: bool,
    /// This node can serve clients in the current mode (full-sync: it is the serving
    /// leader; dynsec-sync: it is a caught-up member).
    pub ready: bool,
}

/// Read access to the node, implemented by the broker (later the Raft node).
/// Called on the HTTP tasks: must be quick and must not block.
pub trait AdminView: Send + Sync + 'static {
    fn node_status(&self) -> NodeStatus;
    /// Appends the metrics in Prometheus text exposition format to `out`.
    fn render_metrics(&self, out: &mut String);
}

/// The `[admin]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token for `/api/v1`; `None` or empty = no token required (health and
    /// metrics always stay open).
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8080)), token: None }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum AdminError {
    #[error("admin HTTP: cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin HTTP server: {0}")]
    Serve(#[source] std::io::Error),
}

/// A bound admin server; [`run`](AdminServer::run) serves it.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
}

impl AdminServer {
    /// Binds the socket so the caller learns the address (and port-in-use errors)
    /// before spawning [`run`](AdminServer::run).
    pub async fn bind(cfg: &AdminConfig, view: Arc<dyn AdminView>) -> Result<AdminServer, AdminError> {
        AdminServer::bind_with_cluster(cfg, view, None).await
    }

    /// [`bind`](AdminServer::bind), with the Raft node the cluster routes use
    /// (without one they answer 503).
    pub async fn bind_with_cluster(
        cfg: &AdminConfig,
        view: Arc<dyn AdminView>,
        raft: Option<Arc<RaftNode>>,
    ) -> Result<AdminServer, AdminError> {
        AdminServer::bind_with_extra(cfg, view, raft, Router::new()).await
    }

    /// [`bind_with_cluster`](AdminServer::bind_with_cluster), plus `extra`
    /// routes of other modules (e.g. `backup::http::routes`) mounted under
    /// `/api/v1` behind the token check.
    pub async fn bind_with_extra(
        cfg: &AdminConfig,
        view: Arc<dyn AdminView>,
        raft: Option<Arc<RaftNode>>,
        extra: Router,
    ) -> Result<AdminServer, AdminError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| AdminError::Bind { addr: cfg.listen, source })?;
        let local_addr =
            listener.local_addr().map_err(|source| AdminError::Bind { addr: cfg.listen, source })?;
        let router = router_with_extra(view, cfg.token.clone(), raft, extra);
        Ok(AdminServer { listener, local_addr, router })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled (then finishes requests in progress).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AdminError> {
        tracing::info!(addr = %self.local_addr, "admin HTTP listening");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(AdminError::Serve)
    }
}

/// Binds and serves in one call (use [`AdminServer::bind`] to learn the address first).
pub async fn serve(
    cfg: AdminConfig,
    view: Arc<dyn AdminView>,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    AdminServer::bind(&cfg, view).await?.run(shutdown).await
}

/// Every admin route. An empty token counts as none.
pub fn router(view: Arc<dyn AdminView>, token: Option<String>) -> Router {
    router_with_cluster(view, token, None)
}

/// Every admin route, the cluster routes served by `raft`.
pub fn router_with_cluster(
    view: Arc<dyn AdminView>,
    token: Option<String>,
    raft: Option<Arc<RaftNode>>,
) -> Router {
    router_with_extra(view, token, raft, Router::new())
}

/// Every admin route, plus `extra` under `/api/v1` (token-checked too).
pub fn router_with_extra(
    view: Arc<dyn AdminView>,
    token: Option<String>,
    raft: Option<Arc<RaftNode>>,
    extra: Router,
) -> Router {
    let token: Option<Arc<str>> = token.filter(|t| !t.is_empty()).map(Arc::from);
    let api = api_routes()
        .with_state(ApiState { view: view.clone(), raft })
        .merge(extra)
        .route_layer(middleware::from_fn_with_state(token, require_token));
    Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(health_ready))
        .route("/health/leader", get(health_leader))
        .route("/metrics", get(metrics))
        .with_state(view)
        .nest(API_PREFIX, api)
}

/// The `/api/v1` routes (relative paths). Add later REST endpoints here: they get
/// the token check from [`router`].
fn api_routes() -> Router<ApiState> {
    Router::new().route("/status", get(api_status)).merge(cluster::routes()).merge(dynsec::routes())
}

async fn require_token(State(token): State<Option<Arc<str>>>, request: Request, next: Next) -> Response {
    let Some(token) = token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(p) if crate::auth::constant_time_eq(p.as_bytes(), token.as_bytes()) => next.run(request).await,
        _ => {
            let body = ErrorBody { error: "missing or wrong bearer token".into() };
            let mut response = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

fn status_response(ok: bool, status: NodeStatus) -> Response {
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(status)).into_response()
}

async fn health_ready(State(view): State<Arc<dyn AdminView>>) -> Response {
    let status = view.node_status();
    status_response(status.ready, status)
}

async fn health_leader(State(view): State<Arc<dyn AdminView>>) -> Response {
    let status = view.node_status();
    status_response(status.role == Role::Leader && status.serving, status)
}

async fn metrics(State(view): State<Arc<dyn AdminView>>) -> Response {
    let mut out = String::new();
    view.render_metrics(&mut out);
    ([(header::CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE))], out).into_response()
}

async fn api_status(State(view): State<Arc<dyn AdminView>>) -> Json<NodeStatus> {
    Json(view.node_status())
}

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod tests;
