//! Transports: accepts MQTT connections over TCP, TLS (rustls), WebSocket and
//! secure WebSocket, and hands each one to the broker as a byte stream.
//!
//! Owns: the `[[listeners]]` configuration ([`ListenerConfig`]), loading PEM files,
//! the PROXY protocol header where configured (`proxy_protocol = true`: the
//! client address it carries replaces the socket's peer address for
//! everything downstream), the per-connection TLS / WebSocket handshakes (each
//! in its own task, under a timeout, so a slow client never holds up the
//! accept loop), the per-listener connection limit, and [`ClientStream`], the
//! byte stream the broker reads MQTT packets from.
//!
//! Must not touch: MQTT itself (no packet is decoded here), sessions, auth. What
//! happens on a connection after the handshake is the handler's business.

mod proxy;
mod stream;
mod task;
mod tls;
mod ws;
mod x509;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use proxy::ProxyError;
pub use stream::ClientStream;
use task::{ConnLimit, ConnTask, Slot};
pub use ws::WsStream;

/// Time a client gets to complete its TLS and/or WebSocket handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds of the back-off after a failed `accept` (EMFILE, ENOBUFS, ...).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// TCP_DEFER_ACCEPT (Linux): seconds the kernel keeps a new connection that
/// has sent nothing before handing it to `accept` anyway (see [`defer_accept`]).
const DEFER_ACCEPT_SECS: i32 = 1;

/// The transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    #[default]
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl ListenerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }

    fn uses_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }

    fn uses_websocket(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }
}

/// One `[[listeners]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default)]
    pub kind: ListenerKind,
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// PEM certificate chain (tls / wss), leaf first.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or EC) (tls / wss).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates that client certificates are verified against.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse clients without a valid certificate (needs `client_ca_file`). When
    /// false and `client_ca_file` is set, a certificate is optional but verified if sent.
    #[serde(default)]
    pub require_client_cert: bool,
    /// WebSocket request path (ws / wss); any path when absent, else 404.
    #[serde(default)]
    pub path: Option<String>,
    /// Connections open at once on this listener; further ones are closed at once.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Every connection starts with a PROXY protocol header (v1 or v2, e.g.
    /// HAProxy's `send-proxy-v2`) whose client address replaces the socket's
    /// peer address (logs, authentication, metrics). A connection without a
    /// valid header is closed. Only for listeners that trusted load
    /// balancers alone can reach.
    #[serde(default)]
    pub proxy_protocol: bool,
}

fn default_name() -> String {
    "default".to_owned()
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}

impl Default for ListenerConfig {
    /// The listener used when the configuration has none: plain TCP on 127.0.0.1:1883.
    fn default() -> Self {
        ListenerConfig {
            name: default_name(),
            kind: ListenerKind::Tcp,
            bind: default_bind(),
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            require_client_cert: false,
            path: None,
            max_connections: None,
            proxy_protocol: false,
        }
    }
}

/// Errors while setting a listener up. Per-connection failures (handshakes) are
/// logged, never returned: they must not stop the listener.
#[derive(thiserror::Error, Debug)]
pub enum ListenerError {
    #[error("listener {listener}: cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {listener}: `{key}` is required for this listener kind")]
    MissingSetting { listener: String, key: &'static str },
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("listener {listener}: TLS configuration: {source}")]
    Tls {
        listener: String,
        #[source]
        source: rustls::Error,
    },
}

/// A bound listener, ready to [`run`](Listener::run).
pub struct Listener {
    name: String,
    kind: ListenerKind,
    path: Option<String>,
    tcp: TcpListener,
    local_addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    limit: Option<ConnLimit>,
    handshake_timeout: Duration,
    proxy_protocol: bool,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// Asks the kernel to hand a connection to `accept` only once its first bytes
/// have arrived (or after [`DEFER_ACCEPT_SECS`]). Every client speaks first
/// here (MQTT CONNECT, TLS ClientHello, HTTP upgrade, PROXY header), so the
/// accepted socket is readable at once: one wake-up per new connection
/// instead of two (accept, then the first bytes), and silent connections
/// wait in the kernel's queue instead of holding a task. nginx (`deferred`)
/// and HAProxy (`defer-accept`) do the same.
#[cfg(target_os = "linux")]
fn defer_accept(tcp: &TcpListener) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let secs: libc::c_int = DEFER_ACCEPT_SECS;
    // SAFETY: the descriptor is the live listening socket `tcp` owns, and the
    // option value is a c_int whose size is passed along with it.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn defer_accept(_tcp: &TcpListener) -> std::io::Result<()> {
    Ok(())
}

impl Listener {
    /// Loads the PEM files (for tls / wss), builds the TLS configuration and binds
    /// the socket. Errors name the listener and the file concerned.
    pub async fn bind(cfg: &ListenerConfig) -> Result<Listener, ListenerError> {
        // Files first: a bad certificate should be reported even when the port is busy.
        let tls = if cfg.kind.uses_tls() { Some(TlsAcceptor::from(tls::server_config(cfg)?)) } else { None };
        let tcp = TcpListener::bind(cfg.bind).await.map_err(|source| ListenerError::Bind {
            listener: cfg.name.clone(),
            addr: cfg.bind,
            source,
        })?;
        let local_addr = tcp.local_addr().map_err(|source| ListenerError::Bind {
            listener: cfg.name.clone(),
            addr: cfg.bind,
            source,
        })?;
        if let Err(e) = defer_accept(&tcp) {
            tracing::debug!(listener = %cfg.name, error = %e, "TCP_DEFER_ACCEPT not set");
        }
        Ok(Listener {
            name: cfg.name.clone(),
            kind: cfg.kind,
            path: if cfg.kind.uses_websocket() { cfg.path.clone() } else { None },
            tcp,
            local_addr,
            tls,
            limit: cfg.max_connections.map(ConnLimit::new),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            proxy_protocol: cfg.proxy_protocol,
        })
    }

    /// Changes the time a client gets for its TLS / WebSocket handshake.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> ListenerKind {
        self.kind
    }

    /// Accepts connections until `shutdown` is cancelled. Each accepted socket gets
    /// TCP_NODELAY and its own task, which does the TLS / WebSocket handshake under
    /// the handshake timeout and then awaits `handler(stream, peer)`: the
    /// handler's set-up (for the broker, the CONNECT phase), which yields the
    /// future that serves the connection, or `None` when the connection ended
    /// there. Both run in the task; the set-up in a box freed when serving
    /// starts. The connection's slot of `max_connections` is held until the
    /// serving future ends. Accept errors (EMFILE etc.) are logged and retried
    /// after a back-off; they never end the loop. Returns when `shutdown` is
    /// cancelled; connections already handed to the handler are left to it (the
    /// broker closes them on shutdown), handshakes still in progress are abandoned.
    pub async fn run<F, Setup, Serve>(self, handler: F, shutdown: CancellationToken)
    where
        F: Fn(ClientStream, SocketAddr) -> Setup + Send + Sync + 'static,
        Setup: Future<Output = Option<Serve>> + Send + 'static,
        Serve: Future<Output = ()> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let conn = Arc::new(ConnSetup {
            name: self.name.clone(),
            kind: self.kind,
            path: self.path.clone(),
            tls: self.tls.clone(),
            handshake_timeout: self.handshake_timeout,
            proxy_protocol: self.proxy_protocol,
        });
        tracing::info!(
            listener = %self.name,
            kind = self.kind.as_str(),
            addr = %self.local_addr,
            proxy_protocol = self.proxy_protocol,
            "listening"
        );
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.tcp.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(pair) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    pair
                }
                Err(e) => {
                    tracing::warn!(listener = %self.name, error = %e, "accept failed; retrying in {backoff:?}");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            let slot = match &self.limit {
                Some(limit) => match limit.try_take() {
                    Some(slot) => Some(slot),
                    None => {
                        tracing::debug!(listener = %self.name, %peer, "max_connections reached; closing");
                        drop(socket);
                        continue;
                    }
                },
                None => None,
            };
            if let Err(e) = socket.set_nodelay(true) {
                // The socket is usable without it; only latency suffers.
                tracing::debug!(listener = %self.name, %peer, error = %e, "cannot set TCP_NODELAY");
            }
            // The handshake and the handler's set-up run in a box freed once
            // serving starts: for the connection's lifetime the task keeps only
            // the serving future and the slot (idle connections are counted in
            // bytes; task.rs).
            let setup = Box::pin(conn.clone().setup(socket, peer, handler.clone(), shutdown.clone(), slot));
            tokio::spawn(ConnTask::new(setup));
        }
        tracing::info!(listener = %self.name, "listener stopped");
    }
}

/// What a connection task needs for its handshake.
struct ConnSetup {
    name: String,
    kind: ListenerKind,
    path: Option<String>,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    proxy_protocol: bool,
}

impl ConnSetup {
    /// The handshake under the timeout (abandoned on shutdown), then the
    /// handler's set-up; its serving future with the connection's slot of
    /// `max_connections`, or `None` when the connection is closed before that
    /// (the handshake's failures are logged here).
    async fn setup<F, Setup, Serve>(
        self: Arc<Self>,
        socket: TcpStream,
        peer: SocketAddr,
        handler: Arc<F>,
        shutdown: CancellationToken,
        slot: Option<Slot>,
    ) -> Option<(Serve, Option<Slot>)>
    where
        F: Fn(ClientStream, SocketAddr) -> Setup,
        Setup: Future<Output = Option<Serve>>,
    {
        // Plain TCP has no handshake: no timer, and none of the TLS and
        // WebSocket handshake state (boxed, where it is needed) is built and
        // moved around for it.
        let (stream, peer) = if self.kind == ListenerKind::Tcp && !self.proxy_protocol {
            (ClientStream::Tcp(socket), peer)
        } else {
            Box::pin(self.timed_handshake(socket, peer, &shutdown)).await?
        };
        let serve = handler(stream, peer).await?;
        Some((serve, slot))
    }

    /// [`ConnSetup::handshake`] under the handshake timeout, abandoned on
    /// shutdown; `None` (logged here) when it fails.
    async fn timed_handshake(
        &self,
        socket: TcpStream,
        peer: SocketAddr,
        shutdown: &CancellationToken,
    ) -> Option<(ClientStream, SocketAddr)> {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return None,
            result = tokio::time::timeout(self.handshake_timeout, self.handshake(socket, peer)) => result,
        };
        match result {
            Ok(Ok(pair)) => Some(pair),
            Ok(Err(HandshakeError::Proxy(e))) => {
                // Most likely a load balancer (or client) configured without
                // the PROXY protocol: say so plainly.
                tracing::warn!(listener = %self.name, %peer, error = %e, "closing connection: bad PROXY protocol header");
                None
            }
            Ok(Err(e)) => {
                tracing::debug!(listener = %self.name, %peer, error = %e, "handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(listener = %self.name, %peer, "handshake timed out");
                None
            }
        }
    }

    /// The PROXY header (when configured, before anything else: it precedes
    /// TLS), then the transport's handshake. Returns the stream and the
    /// client's address (from the PROXY header when it carries one).
    async fn handshake(
        &self,
        mut socket: TcpStream,
        peer: SocketAddr,
    ) -> Result<(ClientStream, SocketAddr), HandshakeError> {
        let mut client = peer;
        if self.proxy_protocol {
            let timeout = proxy::HEADER_TIMEOUT.min(self.handshake_timeout);
            if let Some(addr) = proxy::read_header(&mut socket, timeout).await? {
                tracing::debug!(listener = %self.name, client = %addr, proxy = %peer, "PROXY protocol header");
                client = addr;
            }
        }
        Ok((self.transport(socket).await?, client))
    }

    async fn transport(&self, socket: TcpStream) -> Result<ClientStream, HandshakeError> {
        let path = self.path.as_deref();
        match (self.kind, &self.tls) {
            (ListenerKind::Tcp, _) => Ok(ClientStream::Tcp(socket)),
            (ListenerKind::Ws, _) => Ok(ClientStream::Ws(Box::new(ws::accept(socket, path).await?))),
            (ListenerKind::Tls, Some(tls)) => Ok(ClientStream::Tls(Box::new(tls.accept(socket).await?))),
            (ListenerKind::Wss, Some(tls)) => {
                let tls_stream = tls.accept(socket).await?;
                Ok(ClientStream::Wss(Box::new(ws::accept(tls_stream, path).await?)))
            }
            // bind() always builds the acceptor for tls / wss.
            (ListenerKind::Tls | ListenerKind::Wss, None) => Err(HandshakeError::NoTlsConfig),
        }
    }
}

#[derive(thiserror::Error, Debug)]
enum HandshakeError {
    #[error("TLS: {0}")]
    Tls(#[from] std::io::Error),
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("no TLS configuration for a TLS listener")]
    NoTlsConfig,
    #[error("{0}")]
    Proxy(#[from] ProxyError),
}

#[cfg(test)]
mod tests;
