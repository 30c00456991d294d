//! The dynamic-security routes of the admin REST API (under `/api/v1`,
//! token-checked by the parent router; run on the leader, forwarded there by
//! followers):
//! - `POST /dynsec/init` `{"username","password"}`: creates the first admin
//!   exactly as `mosquitto_ctrl dynsec init` would (role `admin`, default
//!   access); 409 when dynamic security is already initialised;
//! - `PUT /dynsec` with a Mosquitto `dynamic-security.json` body: replaces the
//!   whole dynamic-security state (migration from Mosquitto; hashes carried
//!   over so users keep their passwords);
//! - `GET /dynsec`: the state as a Mosquitto `dynamic-security.json`;
//! - `POST /dynsec/control`: one control-API message *already prepared* by
//!   `dynsec::prepare_request` (passwords hashed); answers the response
//!   document. Nodes use it in dynsec-sync mode to hand the control requests
//!   their clients send to the leader (src/modes.rs).
//!
//! Day-to-day administration is not here: it is Mosquitto's control API over
//! MQTT (`mosquitto_ctrl dynsec ...`), handled by the broker.

use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::cluster::{err, on_leader, parse, ApiState};
use crate::dynsec::{Dynsec, PasswordHash};
use crate::state::pb;

/// `POST /api/v1/dynsec/init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitRequest {
    pub username: String,
    pub password: String,
}

/// Answer of init and import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DynsecSetAnswer {
    /// Dynamic security was initialised before this request.
    pub was_initialised: bool,
}

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/dynsec/init", post(init))
        .route("/dynsec", get(export).put(import))
        .route("/dynsec/control", post(control))
}

/// Proposes a `DynsecSet`; returns whether dynsec was initialised before.
async fn set(
    raft: &crate::raft::RaftNode,
    state: &Dynsec,
    only_if_uninitialised: bool,
) -> Result<bool, super::cluster::ApiError> {
    let cmd = pb::Command {
        cmd: Some(pb::command::Cmd::DynsecSet(pb::DynsecSet {
            state: Some(state.to_proto()),
            only_if_uninitialised,
        })),
    };
    let applied = raft.apply_command(cmd).await?;
    Ok(applied.existed.first().copied().unwrap_or(false))
}

async fn init(
    State(st): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    on_leader(&st, method, &uri, &headers, body, |raft, body| async move {
        let req: InitRequest = parse(&body)?;
        if req.username.is_empty() || req.password.is_empty() {
            return Err(err(StatusCode::BAD_REQUEST, "username and password must not be empty"));
        }
        if raft.dynsec().is_some() {
            return Err(err(StatusCode::CONFLICT, "dynamic security is already initialised"));
        }
        let initial = Dynsec::initial(&req.username, PasswordHash::new(req.password.as_bytes()));
        if set(&raft, &initial, true).await? {
            return Err(err(StatusCode::CONFLICT, "dynamic security is already initialised"));
        }
        tracing::info!(admin = %req.username, "dynamic security initialised");
        Ok(Json(DynsecSetAnswer { was_initialised: false }).into_response())
    })
    .await
}

async fn import(
    State(st): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    on_leader(&st, method, &uri, &headers, body, |raft, body| async move {
        let imported = Dynsec::from_mosquitto_json(&body)
            .map_err(|e| err(StatusCode::BAD_REQUEST, format!("dynamic-security.json refused: {e}")))?;
        let was = set(&raft, &imported, false).await?;
        tracing::info!("dynamic security imported from a dynamic-security.json");
        Ok(Json(DynsecSetAnswer { was_initialised: was }).into_response())
    })
    .await
}

async fn export(
    State(st): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    on_leader(&st, method, &uri, &headers, body, |raft, _| async move {
        let d =
            raft.dynsec().ok_or_else(|| err(StatusCode::NOT_FOUND, "dynamic security is not initialised"))?;
        Ok(([(header::CONTENT_TYPE, "application/json")], d.to_mosquitto_json()).into_response())
    })
    .await
}

async fn control(
    State(st): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    on_leader(&st, method, &uri, &headers, body, |raft, body| async move {
        let cmd =
            pb::Command { cmd: Some(pb::command::Cmd::DynsecControl(pb::DynsecControl { request: body })) };
        let applied = raft.apply_command(cmd).await?;
        let response = applied.dynsec_response.unwrap_or_default();
        Ok(([(header::CONTENT_TYPE, "application/json")], response).into_response())
    })
    .await
}
