//! `raftmq ctl`: a thin client of any node's admin REST API.
//!
//! Owns the command line of `ctl`, the requests it sends and how answers are
//! shown (tables by default, the API's JSON with `--json`). Requests that need
//! the leader go to whichever node `--url` names: that node forwards them.
//! Exit codes: 0 success, 1 error (connection, HTTP, API error), 2 usage
//! (clap's own exit code for a bad command line; also a URL that does not parse).
//!
//! Must not touch: anything but the HTTP API; it shares the JSON types of
//! `admin::cluster` so both sides agree on the format.

pub mod dynsec;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use hyper::Method;
use serde::de::DeserializeOwned;

use crate::admin::client::{self, BaseUrl, ClientError};
use crate::admin::cluster::{AddNodeRequest, ClusterInfo, ErrorBody, LeaderInfo, MemberInfo, NodeIdRequest};
use crate::admin::{Mode, NodeStatus, Role};

/// Default admin URL (a node's default admin listener).
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";
/// Time allowed for most requests.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);
/// `add-node` waits for the new node to catch up (the server allows 60 s).
const ADD_NODE_TIMEOUT: Duration = Duration::from_secs(150);

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Admin URL of any node of the cluster.
    #[arg(long, env = "RAFTMQ_URL", default_value = DEFAULT_URL, global = true)]
    pub url: String,
    /// Bearer token of the admin API (`[admin] token`).
    #[arg(long, env = "RAFTMQ_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// This node's status and a summary of the cluster.
    Status,
    /// The members: roles, addresses, indexes, replication lag.
    Members,
    /// Adds a node: it joins as a learner, catches up, then becomes a voter
    /// (unless --learner). Start it first with `join = true`.
    AddNode {
        id: u64,
        /// Its cluster (Raft) address, host:port.
        #[arg(long, value_name = "ADDR")]
        cluster: String,
        /// Its MQTT address advertised to clients, host:port.
        #[arg(long, value_name = "ADDR")]
        mqtt: String,
        /// Its admin HTTP address, host:port.
        #[arg(long, value_name = "ADDR")]
        admin: String,
        /// Keep it a non-voting learner.
        #[arg(long)]
        learner: bool,
    },
    /// Removes a node (voter or learner) from the cluster.
    RemoveNode { id: u64 },
    /// Leadership: transfer, pin, unpin.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// The cluster's mode: full-sync (one leader serves; everything
    /// replicated) or dynsec-sync (every node serves; only dynamic security
    /// and settings replicated).
    #[command(subcommand)]
    Mode(ModeCommand),
    /// Dynamic security: init (first admin), import/export of Mosquitto's
    /// dynamic-security.json. Day-to-day: `mosquitto_ctrl dynsec ...`.
    #[command(subcommand)]
    Dynsec(dynsec::DynsecCommand),
    /// Backups: create, list, inspect, download, upload, restore, delete.
    #[command(subcommand)]
    Backup(crate::backup::cli::BackupCommand),
}

#[derive(Subcommand, Debug)]
pub enum ModeCommand {
    /// Prints the mode.
    Get,
    /// Switches the mode of the running cluster.
    Set {
        #[arg(value_parser = ["full-sync", "dynsec-sync"])]
        mode: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum LeaderCommand {
    /// Moves leadership to a voter now.
    Transfer { id: u64 },
    /// Prefers this node as leader: leadership moves to it while it is healthy
    /// and caught up, and returns to it after it recovers.
    Pin { id: u64 },
    /// Removes the preference.
    Unpin,
}

#[derive(thiserror::Error, Debug)]
pub enum CtlError {
    #[error("{0}")]
    Url(ClientError),
    #[error(
        "cannot connect to the admin API at {url}: {source} (is the node running? set --url or RAFTMQ_URL)"
    )]
    Connect { url: String, source: std::io::Error },
    #[error("the admin API at {url} refused the request: the token is missing or wrong (use --token or RAFTMQ_TOKEN)")]
    Unauthorized { url: String },
    #[error("{0}")]
    Client(ClientError),
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("unexpected answer from {url}: {message}")]
    BadResponse { url: String, message: String },
    /// A problem on this side (input, files) before or after the request.
    #[error("{0}")]
    Local(String),
}

/// Runs one `ctl` command; prints the result or the error.
pub fn run(args: CtlArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("raftmq ctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(&args)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("raftmq ctl: {e}");
            // A URL that cannot be parsed is a usage error, like clap's.
            if matches!(e, CtlError::Url(_)) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A connection to one node's admin API.
pub struct Api {
    base: BaseUrl,
    token: Option<String>,
}

impl Api {
    pub fn new(url: &str, token: Option<String>) -> Result<Api, CtlError> {
        Ok(Api { base: BaseUrl::parse(url).map_err(CtlError::Url)?, token })
    }

    /// Sends a request under `/api/v1` and decodes the JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        timeout: Duration,
    ) -> Result<(T, Bytes), CtlError> {
        let url = self.base.as_url();
        let full = format!("{}/api/v1{path}", self.base.prefix);
        let resp = client::request(
            &self.base.authority,
            method,
            &full,
            self.token.as_deref(),
            &[],
            body.map(Bytes::from),
            timeout,
        )
        .await
        .map_err(|e| match e {
            ClientError::Connect { source, .. } => CtlError::Connect { url: url.clone(), source },
            e => CtlError::Client(e),
        })?;
        if resp.status == 401 {
            return Err(CtlError::Unauthorized { url });
        }
        if !(200..300).contains(&resp.status) {
            let message = serde_json::from_slice::<ErrorBody>(&resp.body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&resp.body).trim().to_string());
            return Err(CtlError::Api { status: resp.status, message });
        }
        let value = serde_json::from_slice(&resp.body)
            .map_err(|e| CtlError::BadResponse { url, message: e.to_string() })?;
        Ok((value, resp.body))
    }
}

pub(crate) fn json_body<T: serde::Serialize>(v: &T) -> Option<String> {
    serde_json::to_string(v).ok()
}

/// Runs the command and returns what to print.
pub async fn execute(args: &CtlArgs) -> Result<String, CtlError> {
    let api = Api::new(&args.url, args.token.clone())?;
    let raw = |b: Bytes| format!("{}\n", String::from_utf8_lossy(&b));
    match &args.command {
        CtlCommand::Status => {
            let (status, status_raw): (NodeStatus, _) =
                api.call(Method::GET, "/status", None, TIMEOUT).await?;
            let (cluster, cluster_raw): (ClusterInfo, _) =
                api.call(Method::GET, "/cluster", None, TIMEOUT).await?;
            if args.json {
                return Ok(format!(
                    "{{\"node\":{},\"cluster\":{}}}\n",
                    String::from_utf8_lossy(&status_raw),
                    String::from_utf8_lossy(&cluster_raw)
                ));
            }
            Ok(format_status(&status, &cluster))
        }
        CtlCommand::Members => {
            let (cluster, body): (ClusterInfo, _) = api.call(Method::GET, "/cluster", None, TIMEOUT).await?;
            Ok(if args.json { raw(body) } else { format_members(&cluster) })
        }
        CtlCommand::AddNode { id, cluster, mqtt, admin, learner } => {
            let req = AddNodeRequest {
                id: *id,
                cluster_addr: cluster.clone(),
                mqtt_addr: mqtt.clone(),
                admin_addr: admin.clone(),
                learner: *learner,
            };
            let (info, body): (ClusterInfo, _) =
                api.call(Method::POST, "/cluster/nodes", json_body(&req), ADD_NODE_TIMEOUT).await?;
            if args.json {
                return Ok(raw(body));
            }
            let what = if *learner { "a learner" } else { "a voter" };
            Ok(format!("node {id} added as {what}\n\n{}", format_members(&info)))
        }
        CtlCommand::RemoveNode { id } => {
            let (info, body): (ClusterInfo, _) =
                api.call(Method::DELETE, &format!("/cluster/nodes/{id}"), None, TIMEOUT).await?;
            if args.json {
                return Ok(raw(body));
            }
            Ok(format!("node {id} removed\n\n{}", format_members(&info)))
        }
        CtlCommand::Leader(cmd) => {
            let (method, path, body) = match cmd {
                LeaderCommand::Transfer { id } => {
                    (Method::POST, "/cluster/leader/transfer", json_body(&NodeIdRequest { node_id: *id }))
                }
                LeaderCommand::Pin { id } => {
                    (Method::POST, "/cluster/leader/pin", json_body(&NodeIdRequest { node_id: *id }))
                }
                LeaderCommand::Unpin => (Method::DELETE, "/cluster/leader/pin", None),
            };
            let (info, raw_body): (LeaderInfo, _) = api.call(method, path, body, TIMEOUT).await?;
            Ok(if args.json { raw(raw_body) } else { format_leader(cmd, &info) })
        }
        CtlCommand::Dynsec(cmd) => dynsec::execute(&api, cmd, args.json).await,
        CtlCommand::Mode(cmd) => {
            use crate::admin::cluster::ModeInfo;
            let (info, body): (ModeInfo, _) = match cmd {
                ModeCommand::Get => api.call(Method::GET, "/cluster/mode", None, TIMEOUT).await?,
                ModeCommand::Set { mode } => {
                    let mode = if mode == "dynsec-sync" { Mode::DynsecSync } else { Mode::FullSync };
                    api.call(Method::POST, "/cluster/mode", json_body(&ModeInfo { mode }), TIMEOUT).await?
                }
            };
            Ok(if args.json {
                raw(body)
            } else {
                match cmd {
                    ModeCommand::Get => format!("{}\n", mode_text(info.mode)),
                    ModeCommand::Set { .. } => format!("mode set to {}\n", mode_text(info.mode)),
                }
            })
        }
        CtlCommand::Backup(cmd) => crate::backup::cli::execute(args, cmd).await,
    }
}

// ------------------------------------------------------------ formatting

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn role_text(r: Role) -> &'static str {
    match r {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::Learner => "learner",
    }
}

fn mode_text(m: Mode) -> &'static str {
    match m {
        Mode::FullSync => "full-sync",
        Mode::DynsecSync => "dynsec-sync",
    }
}

/// `ctl status`.
pub fn format_status(s: &NodeStatus, c: &ClusterInfo) -> String {
    let leader = match c.leader_id.and_then(|l| c.nodes.iter().find(|n| n.id == l)) {
        Some(n) => format!("{} (mqtt {}, admin {})", n.id, n.mqtt_addr, n.admin_addr),
        None => match c.leader_id {
            Some(l) => l.to_string(),
            None => "none (election in progress or no quorum)".into(),
        },
    };
    let voters = c.nodes.iter().filter(|n| n.voter).count();
    let reachable = c.nodes.iter().filter(|n| n.reachable).count();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node         {} ({}{})",
        s.node_id,
        role_text(s.role),
        if s.serving { ", serving" } else { "" }
    );
    let _ = writeln!(out, "leader       {leader}");
    let _ = writeln!(out, "term         {}", s.term);
    let _ = writeln!(out, "commit index {}", s.commit_index);
    let _ = writeln!(out, "applied      {}", s.applied_index);
    let _ = writeln!(out, "mode         {}", mode_text(c.mode));
    let _ = writeln!(
        out,
        "pinned       {}",
        c.pinned_leader.map(|p| format!("node {p}")).unwrap_or_else(|| "none".into())
    );
    let _ = writeln!(
        out,
        "members      {} ({} voters, {} learners), {} reachable",
        c.nodes.len(),
        voters,
        c.nodes.len() - voters,
        reachable
    );
    out
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn member_row(n: &MemberInfo) -> Vec<String> {
    let role = match (&n.role, n.reachable) {
        (Some(r), _) => r.clone(),
        (None, false) => "unreachable".into(),
        (None, true) => "-".into(),
    };
    vec![
        format!("{}{}", n.id, if n.leader { "*" } else { "" }),
        role,
        if n.voter { "voter" } else { "learner" }.into(),
        n.mqtt_addr.clone(),
        n.admin_addr.clone(),
        n.cluster_addr.clone(),
        opt(n.term),
        opt(n.commit_index),
        opt(n.applied_index),
        opt(n.matched_index),
        opt(n.lag),
    ]
}

/// `ctl members`.
pub fn format_members(c: &ClusterInfo) -> String {
    let header =
        ["ID", "ROLE", "VOTE", "MQTT", "ADMIN", "CLUSTER", "TERM", "COMMIT", "APPLIED", "MATCHED", "LAG"];
    let rows: Vec<Vec<String>> = c.nodes.iter().map(member_row).collect();
    let mut out = table(&header, &rows);
    let _ = write!(
        out,
        "\n* leader: {}   pinned: {}   mode: {}   (answered by node {})\n",
        opt(c.leader_id),
        c.pinned_leader.map(|p| p.to_string()).unwrap_or_else(|| "none".into()),
        mode_text(c.mode),
        c.answered_by
    );
    out
}

/// `ctl leader ...`.
pub fn format_leader(cmd: &LeaderCommand, info: &LeaderInfo) -> String {
    match cmd {
        LeaderCommand::Transfer { id } => format!("leadership moved to node {id}\n"),
        LeaderCommand::Pin { id } => format!(
            "leadership pinned to node {id} (leader now: {}); it moves there while node {id} is healthy and caught up\n",
            opt(info.leader_id)
        ),
        LeaderCommand::Unpin => format!("leadership unpinned (leader now: {})\n", opt(info.leader_id)),
    }
}

#[cfg(test)]
mod tests;
