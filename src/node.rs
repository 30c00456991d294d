//! A node: wires configuration, authentication, the broker, the MQTT listeners
//! and the admin HTTP server together, and owns the order of start-up and
//! shutdown.
//!
//! Start-up binds every socket before serving anything, so a port in use or a
//! bad certificate stops the node with a clear error instead of leaving it half
//! up. Shutdown (SIGINT or SIGTERM) stops accepting, lets the broker say
//! goodbye to its clients (MQTT 5: DISCONNECT 0x8B), then ends.
//!
//! This module holds no protocol or state logic; it only connects the parts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{AdminError, AdminServer, AdminView, Mode, NodeStatus, Role};
use crate::auth::{AuthConfig, AuthError};
use crate::broker::Broker;
use crate::config::Config;
use crate::listener::{Listener, ListenerError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot create the data folder {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
    #[error("listener: {0}")]
    Listener(#[from] ListenerError),
    #[error("admin HTTP: {0}")]
    Admin(#[from] AdminError),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
}

/// Logs to stderr; the filter comes from `RAFTMQ_LOG` (or `RUST_LOG`), default `info`.
pub fn init_logging() {
    let filter = std::env::var("RAFTMQ_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second initialisation (tests) is harmless: keep the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs a node until SIGINT or SIGTERM.
pub fn run(config: Config) -> Result<(), NodeError> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(NodeError::Runtime)?;
    runtime.block_on(async move {
        let node = Node::start(config).await?;
        wait_for_signal().await?;
        info!("shutting down");
        node.stop().await;
        Ok(())
    })
}

/// A started node; `stop` ends it.
pub struct Node {
    broker: Broker,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Binds every socket, then starts serving.
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| NodeError::DataDir { path: config.data_dir.clone(), source })?;

        let auth = crate::auth::from_config(&AuthConfig {
            allow_anonymous: config.mqtt.allow_anonymous,
            password_file: config.mqtt.password_file.clone(),
        })?;
        if config.mqtt.allow_anonymous && config.mqtt.password_file.is_none() {
            let public = config.listeners.iter().any(|l| !l.bind.ip().is_loopback());
            if public {
                warn!("anonymous clients are allowed on a listener that is not on localhost");
            }
        }

        let mut listeners = Vec::with_capacity(config.listeners.len());
        for cfg in &config.listeners {
            listeners.push(Listener::bind(cfg).await?);
        }

        let broker = Broker::new(config.mqtt.clone(), auth);
        let mqtt_addr = listeners.first().map(|l| l.local_addr());
        let view = Arc::new(SingleNodeView { node_id: config.node_id, mqtt_addr, broker: broker.clone() });
        let admin = AdminServer::bind(&config.admin, view).await?;

        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        for listener in listeners {
            let broker = broker.clone();
            let handler = move |stream, peer: SocketAddr| {
                let broker = broker.clone();
                async move { broker.serve_connection(stream, peer).await }
            };
            tasks.push(tokio::spawn(listener.run(handler, shutdown.clone())));
        }
        let admin_shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = admin.run(admin_shutdown).await {
                warn!(error = %e, "admin HTTP server stopped");
            }
        }));
        info!(node_id = config.node_id, data_dir = %config.data_dir.display(), "node started");
        Ok(Node { broker, shutdown, tasks })
    }

    /// Stops accepting, disconnects every client, and waits for the tasks.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.broker.shutdown().await;
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn wait_for_signal() -> Result<(), NodeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(NodeError::Signal)?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(NodeError::Signal),
        _ = term.recv() => Ok(()),
    }
}

/// What the admin endpoints report for a single node: it is always the serving
/// leader of its one-member group.
struct SingleNodeView {
    node_id: u64,
    mqtt_addr: Option<SocketAddr>,
    broker: Broker,
}

impl AdminView for SingleNodeView {
    fn node_status(&self) -> NodeStatus {
        // One batch of commands is what one Raft log entry will carry: its count
        // is this single node's log index.
        let applied = self.broker.metrics().batches_applied.load(std::sync::atomic::Ordering::Relaxed);
        NodeStatus {
            node_id: self.node_id,
            role: Role::Leader,
            leader_id: Some(self.node_id),
            leader_mqtt_addr: self.mqtt_addr.map(|a| a.to_string()),
            term: 1,
            commit_index: applied,
            applied_index: applied,
            mode: Mode::FullSync,
            serving: true,
            ready: true,
        }
    }

    fn render_metrics(&self, out: &mut String) {
        self.broker.metrics().render_prometheus(out);
    }
}
