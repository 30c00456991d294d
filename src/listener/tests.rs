//! Listener tests over real loopback sockets, with certificates made by rcgen.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::*;

const DEADLINE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// What the handler saw about one connection.
#[derive(Debug)]
struct Seen {
    kind: ListenerKind,
    nodelay: bool,
    client_certs: usize,
    client_cn: Option<String>,
    peer: SocketAddr,
}

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    seen: mpsc::Receiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

/// Runs `listener` with an echo handler that reports each connection on `seen`.
fn start(listener: Listener) -> Running {
    let addr = listener.local_addr();
    let shutdown = CancellationToken::new();
    let (tx, seen) = mpsc::channel(16);
    let handler = move |mut stream: ClientStream, peer: SocketAddr| {
        let tx = tx.clone();
        // No set-up phase: serve at once.
        std::future::ready(Some(async move {
            let info = Seen {
                kind: stream.kind(),
                nodelay: stream.tcp().nodelay().unwrap_or(false),
                client_certs: stream.peer_certificates().map_or(0, |c| c.len()),
                client_cn: stream.peer_cert_common_name(),
                peer,
            };
            let _ = tx.send(info).await;
            let mut buf = vec![0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() || stream.flush().await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = stream.shutdown().await;
        }))
    };
    let task = tokio::spawn(listener.run(handler, shutdown.clone()));
    Running { addr, shutdown, seen, task }
}

fn cfg(kind: ListenerKind) -> ListenerConfig {
    ListenerConfig {
        name: format!("test-{}", kind.as_str()),
        kind,
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ListenerConfig::default()
    }
}

/// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate,
/// written as PEM files into a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca_der: CertificateDer<'static>,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: PrivatePkcs8KeyDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "raftmq test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params.signed_by(&server_key, &ca).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params.distinguished_name.push(DnType::CommonName, "client-1");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params.signed_by(&client_key, &ca).unwrap();

        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        // Chain file: leaf then CA, as deployments usually have it.
        std::fs::write(dir.path().join("server.pem"), format!("{}{}", server_cert.pem(), ca.pem())).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
        Pki {
            ca_der: ca.der().clone(),
            client_chain: vec![client_cert.der().clone()],
            client_key: PrivatePkcs8KeyDer::from(client_key.serialize_der()),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn listener_cfg(&self, kind: ListenerKind) -> ListenerConfig {
        ListenerConfig {
            cert_file: Some(self.path("server.pem")),
            key_file: Some(self.path("server.key")),
            ..cfg(kind)
        }
    }

    fn connector(&self, with_client_cert: bool) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let builder =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let config = if with_client_cert {
            builder
                .with_client_auth_cert(
                    self.client_chain.clone(),
                    PrivateKeyDer::Pkcs8(self.client_key.clone_key()),
                )
                .unwrap()
        } else {
            builder.with_no_client_auth()
        };
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

async fn tls_connect(
    pki: &Pki,
    addr: SocketAddr,
    with_client_cert: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    pki.connector(with_client_cert).connect(name, tcp).await
}

/// Writes `data` in the given pieces and reads the echo back.
async fn echo_round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    pieces: &[&[u8]],
) {
    let expected: Vec<u8> = pieces.concat();
    for piece in pieces {
        within("write", s.write_all(piece)).await.unwrap();
        within("flush", s.flush()).await.unwrap();
    }
    let mut got = vec![0u8; expected.len()];
    within("read echo", s.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn tcp_echo_through_run_with_nodelay() {
    let listener = Listener::bind(&cfg(ListenerKind::Tcp)).await.unwrap();
    assert_ne!(listener.local_addr().port(), 0);
    let mut running = start(listener);
    let mut client = TcpStream::connect(running.addr).await.unwrap();
    echo_round_trip(&mut client, &[b"hello ", b"world"]).await;
    let seen = within("handler", running.seen.recv()).await.unwrap();
    assert_eq!(seen.kind, ListenerKind::Tcp);
    assert!(seen.nodelay, "TCP_NODELAY set on accepted sockets");
    assert_eq!(seen.peer, client.local_addr().unwrap());

    // Shutdown ends run().
    running.shutdown.cancel();
    within("run() returns on shutdown", &mut running.task).await.unwrap();
}

#[tokio::test]
async fn tls_server_only() {
    let pki = Pki::new();
    let listener = Listener::bind(&pki.listener_cfg(ListenerKind::Tls)).await.unwrap();
    let mut running = start(listener);
    let mut client = within("tls connect", tls_connect(&pki, running.addr, false)).await.unwrap();
    echo_round_trip(&mut client, &[b"\x10\x0c", b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"]).await;
    let seen = within("handler", running.seen.recv()).await.unwrap();
    assert_eq!(seen.kind, ListenerKind::Tls);
    assert_eq!(seen.client_certs, 0);
    assert!(seen.nodelay);
}

#[tokio::test]
async fn tls_required_client_cert() {
    let pki = Pki::new();
    let cfg = ListenerConfig {
        client_ca_file: Some(pki.path("ca.pem")),
        require_client_cert: true,
        ..pki.listener_cfg(ListenerKind::Tls)
    };
    let mut running = start(Listener::bind(&cfg).await.unwrap());

    // Without a certificate: refused. With TLS 1.3 the client may finish its side of
    // the handshake first; the server's refusal then shows on the first read.
    match within("tls connect without cert", tls_connect(&pki, running.addr, false)).await {
        Err(_) => {}
        Ok(mut s) => {
            let _ = s.write_all(b"ping").await;
            let mut buf = [0u8; 4];
            let r = within("read after refusal", s.read(&mut buf)).await;
            assert!(matches!(r, Err(_) | Ok(0)), "server must refuse a client without certificate: {r:?}");
        }
    }

    // With a certificate from the CA: accepted, and the handler sees it.
    let mut client = within("tls connect with cert", tls_connect(&pki, running.addr, true)).await.unwrap();
    echo_round_trip(&mut client, &[b"abc"]).await;
    let seen = within("handler", running.seen.recv()).await.unwrap();
    assert_eq!(seen.client_certs, 1);
    assert_eq!(seen.client_cn.as_deref(), Some("client-1"));
    // The refused client never reached the handler: the first connection handled is
    // the one with a certificate.
    assert_eq!(seen.peer, client.get_ref().0.local_addr().unwrap());
}

#[tokio::test]
async fn tls_optional_client_cert() {
    let pki = Pki::new();
    let cfg = ListenerConfig {
        client_ca_file: Some(pki.path("ca.pem")),
        require_client_cert: false,
        ..pki.listener_cfg(ListenerKind::Tls)
    };
    let mut running = start(Listener::bind(&cfg).await.unwrap());
    let mut anonymous = within("connect without cert", tls_connect(&pki, running.addr, false)).await.unwrap();
    echo_round_trip(&mut anonymous, &[b"x"]).await;
    assert_eq!(within("handler", running.seen.recv()).await.unwrap().client_certs, 0);
    let mut with_cert = within("connect with cert", tls_connect(&pki, running.addr, true)).await.unwrap();
    echo_round_trip(&mut with_cert, &[b"y"]).await;
    assert_eq!(within("handler", running.seen.recv()).await.unwrap().client_certs, 1);
}

fn ws_request(
    url: &str,
    protocols: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = url.into_client_request().unwrap();
    if let Some(p) = protocols {
        request.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_str(p).unwrap());
    }
    request
}

/// Sends `pieces` as separate binary frames and collects the echoed bytes, whatever
/// the framing of the answer.
async fn ws_echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, pieces: &[&[u8]])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let expected: Vec<u8> = pieces.concat();
    for piece in pieces {
        within("ws send", ws.send(Message::binary(piece.to_vec()))).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < expected.len() {
        match within("ws receive", ws.next()).await {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, expected);
}

#[tokio::test]
async fn websocket_mqtt_subprotocol_and_split_frames() {
    let listener = Listener::bind(&cfg(ListenerKind::Ws)).await.unwrap();
    let mut running = start(listener);
    let url = format!("ws://{}/mqtt", running.addr);

    let tcp = TcpStream::connect(running.addr).await.unwrap();
    let (mut ws, response) =
        within("ws handshake", tokio_tungstenite::client_async(ws_request(&url, Some("mqtt")), tcp))
            .await
            .unwrap();
    assert_eq!(response.headers().get(SEC_WEBSOCKET_PROTOCOL).unwrap(), "mqtt");
    // A CONNECT split over three frames, then a frame carrying two PINGREQs.
    ws_echo(&mut ws, &[b"\x10", b"\x0c\x00\x04MQ", b"TT\x04\x02\x00\x3c\x00\x00", b"\xc0\x00\xc0\x00"]).await;
    let seen = within("handler", running.seen.recv()).await.unwrap();
    assert_eq!(seen.kind, ListenerKind::Ws);
    assert!(seen.nodelay);
    // Pings are answered and do not disturb the byte stream.
    within("ws ping", ws.send(Message::Ping(b"hi".to_vec().into()))).await.unwrap();
    match within("ws pong", ws.next()).await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"hi"),
        other => panic!("expected a pong, got {other:?}"),
    }
    ws_echo(&mut ws, &[b"\xe0\x00"]).await;

    // The older subprotocol name is answered too; "mqtt" wins when both are offered.
    let tcp = TcpStream::connect(running.addr).await.unwrap();
    let (_ws, response) = within(
        "ws handshake mqttv3.1",
        tokio_tungstenite::client_async(ws_request(&url, Some("mqttv3.1")), tcp),
    )
    .await
    .unwrap();
    assert_eq!(response.headers().get(SEC_WEBSOCKET_PROTOCOL).unwrap(), "mqttv3.1");
    let tcp = TcpStream::connect(running.addr).await.unwrap();
    let (_ws, response) = within(
        "ws handshake both",
        tokio_tungstenite::client_async(ws_request(&url, Some("mqttv3.1, mqtt")), tcp),
    )
    .await
    .unwrap();
    assert_eq!(response.headers().get(SEC_WEBSOCKET_PROTOCOL).unwrap(), "mqtt");
}

#[tokio::test]
async fn websocket_text_frame_closes_the_stream() {
    let mut running = start(Listener::bind(&cfg(ListenerKind::Ws)).await.unwrap());
    let url = format!("ws://{}/", running.addr);
    let tcp = TcpStream::connect(running.addr).await.unwrap();
    let (mut ws, _) =
        within("ws handshake", tokio_tungstenite::client_async(ws_request(&url, Some("mqtt")), tcp))
            .await
            .unwrap();
    within("handler", running.seen.recv()).await.unwrap();
    within("send text", ws.send(Message::text("not mqtt"))).await.unwrap();
    // The handler's read fails, it shuts the stream down: the client sees a close.
    match within("ws receive after text", ws.next()).await {
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {}
        Some(Ok(other)) => panic!("no echo expected for a text frame, got {other:?}"),
    }
}

#[tokio::test]
async fn websocket_path_check() {
    let cfg = ListenerConfig { path: Some("/mqtt".to_owned()), ..cfg(ListenerKind::Ws) };
    let mut running = start(Listener::bind(&cfg).await.unwrap());

    let tcp = TcpStream::connect(running.addr).await.unwrap();
    let url = format!("ws://{}/other", running.addr);
    match within("ws wrong path", tokio_tungstenite::client_async(ws_request(&url, Some("mqtt")), tcp)).await
    {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("expected a 404, got {other:?}"),
    }

    let tcp = TcpStream::connect(running.addr).await.unwrap();
    let url = format!("ws://{}/mqtt", running.addr);
    let (mut ws, _) =
        within("ws right path", tokio_tungstenite::client_async(ws_request(&url, Some("mqtt")), tcp))
            .await
            .unwrap();
    ws_echo(&mut ws, &[b"ok"]).await;
    // Only the connection with the right path reached the handler.
    let seen = within("handler", running.seen.recv()).await.unwrap();
    assert_eq!(seen.kind, ListenerKind::Ws);
    assert!(running.seen.try_recv().is_err());
}

#[tokio::test]
async fn secure_websocket() {
    let pki = Pki::new();
    let cfg = ListenerConfig { path: Some("/mqtt".to_owned()), ..pki.listener_cfg(ListenerKind::Wss) };
    let mut running = start(Listener::bind(&cfg).await.unwrap());
    let tls = within("tls connect", tls_connect(&pki, running.addr, false)).await.unwrap();
    let url = format!("wss://localhost:{}/mqtt", running.addr.port());
    let (mut ws, response) =
        within("wss handshake", tokio_tungstenite::client_async(ws_request(&url, Some("mqtt")), tls))
            .await
            .unwrap();
    assert_eq!(response.headers().get(SEC_WEBSOCKET_PROTOCOL).unwrap(), "mqtt");
    ws_echo(&mut ws, &[b"\x30\x07\x00\x01", b"t", b"hey"]).await;
    let seen = within("handler", running.seen.recv()).await.unwrap();
    assert_eq!(seen.kind, ListenerKind::Wss);
    assert!(seen.nodelay);
}

#[tokio::test]
async fn slow_handshake_does_not_block_other_clients_and_times_out() {
    let pki = Pki::new();
    let listener = Listener::bind(&pki.listener_cfg(ListenerKind::Tls))
        .await
        .unwrap()
        .with_handshake_timeout(Duration::from_millis(300));
    let mut running = start(listener);

    // A client that connects and never starts TLS.
    let mut stalled = TcpStream::connect(running.addr).await.unwrap();
    // Meanwhile a normal client is served.
    let mut client = within("tls connect", tls_connect(&pki, running.addr, false)).await.unwrap();
    echo_round_trip(&mut client, &[b"fast"]).await;
    within("handler", running.seen.recv()).await.unwrap();
    // The stalled one is dropped once its handshake timeout passes.
    let mut buf = [0u8; 1];
    let r = within("stalled client closed", stalled.read(&mut buf)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(running.seen.try_recv().is_err(), "the stalled client never reached the handler");
}

#[tokio::test]
async fn max_connections_per_listener() {
    let cfg = ListenerConfig { max_connections: Some(1), ..cfg(ListenerKind::Tcp) };
    let mut running = start(Listener::bind(&cfg).await.unwrap());
    let mut first = TcpStream::connect(running.addr).await.unwrap();
    echo_round_trip(&mut first, &[b"1"]).await;
    within("handler", running.seen.recv()).await.unwrap();

    // Over the limit: closed at once.
    let mut second = TcpStream::connect(running.addr).await.unwrap();
    let mut buf = [0u8; 1];
    let r = within("second closed", second.read(&mut buf)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");

    // Once the first ends, its slot is free again (the handler returns
    // asynchronously, so retry until a deadline).
    drop(first);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut third = TcpStream::connect(running.addr).await.unwrap();
        let ok = third.write_all(b"3").await.is_ok() && matches!(third.read(&mut buf).await, Ok(1));
        if ok {
            assert_eq!(&buf, b"3");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn bad_pem_files_give_clear_errors() {
    let pki = Pki::new();
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();

    let bad_cert = ListenerConfig { cert_file: Some(garbage.clone()), ..pki.listener_cfg(ListenerKind::Tls) };
    let err = Listener::bind(&bad_cert).await.unwrap_err();
    assert!(matches!(err, ListenerError::BadCertificate { .. }), "{err}");
    assert!(err.to_string().contains(&garbage.display().to_string()), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");

    let bad_key = ListenerConfig { key_file: Some(garbage.clone()), ..pki.listener_cfg(ListenerKind::Wss) };
    let err = Listener::bind(&bad_key).await.unwrap_err();
    assert!(err.to_string().contains(&garbage.display().to_string()), "{err}");
    assert!(err.to_string().contains("private key"), "{err}");

    let missing = pki.path("missing.pem");
    let no_file = ListenerConfig { cert_file: Some(missing.clone()), ..pki.listener_cfg(ListenerKind::Tls) };
    let err = Listener::bind(&no_file).await.unwrap_err();
    assert!(matches!(err, ListenerError::ReadFile { .. }), "{err}");
    assert!(err.to_string().contains(&missing.display().to_string()), "{err}");

    // The CA file as key: a key that does not match the certificate.
    let other_key = pki.path("other.key");
    std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let mismatched = ListenerConfig { key_file: Some(other_key), ..pki.listener_cfg(ListenerKind::Tls) };
    let err = Listener::bind(&mismatched).await.unwrap_err();
    assert!(err.to_string().contains("server.pem"), "{err}");

    let bad_ca =
        ListenerConfig { client_ca_file: Some(garbage.clone()), ..pki.listener_cfg(ListenerKind::Tls) };
    let err = Listener::bind(&bad_ca).await.unwrap_err();
    assert!(err.to_string().contains(&garbage.display().to_string()), "{err}");

    let no_cert = ListenerConfig { cert_file: None, ..pki.listener_cfg(ListenerKind::Tls) };
    let err = Listener::bind(&no_cert).await.unwrap_err();
    assert!(matches!(err, ListenerError::MissingSetting { key: "cert_file", .. }), "{err}");

    let no_ca = ListenerConfig { require_client_cert: true, ..pki.listener_cfg(ListenerKind::Tls) };
    let err = Listener::bind(&no_ca).await.unwrap_err();
    assert!(matches!(err, ListenerError::MissingSetting { key: "client_ca_file", .. }), "{err}");
}

#[tokio::test]
async fn port_in_use_is_a_bind_error() {
    let first = Listener::bind(&cfg(ListenerKind::Tcp)).await.unwrap();
    let taken = ListenerConfig { bind: first.local_addr(), ..cfg(ListenerKind::Tcp) };
    let err = Listener::bind(&taken).await.unwrap_err();
    assert!(matches!(err, ListenerError::Bind { .. }), "{err}");
    assert!(err.to_string().contains(&first.local_addr().to_string()), "{err}");
}

#[test]
fn listener_config_from_toml() {
    #[derive(Deserialize)]
    struct File {
        listeners: Vec<ListenerConfig>,
    }
    let file: File = toml::from_str(
        r#"
        [[listeners]]
        name = "default"
        kind = "tcp"
        bind = "127.0.0.1:1883"

        [[listeners]]
        name = "secure-ws"
        kind = "wss"
        bind = "0.0.0.0:8884"
        cert_file = "server.pem"
        key_file = "server.key"
        client_ca_file = "ca.pem"
        require_client_cert = true
        path = "/mqtt"
        max_connections = 500
        proxy_protocol = true
        "#,
    )
    .unwrap();
    assert_eq!(file.listeners[0], ListenerConfig::default());
    let wss = &file.listeners[1];
    assert_eq!(wss.kind, ListenerKind::Wss);
    assert_eq!(wss.bind, SocketAddr::from(([0, 0, 0, 0], 8884)));
    assert_eq!(wss.client_ca_file.as_deref(), Some(std::path::Path::new("ca.pem")));
    assert!(wss.require_client_cert);
    assert!(wss.proxy_protocol && !file.listeners[0].proxy_protocol);
    assert_eq!(wss.path.as_deref(), Some("/mqtt"));
    assert_eq!(wss.max_connections, Some(500));

    assert!(toml::from_str::<ListenerConfig>("kind = \"quic\"").is_err());
    assert!(toml::from_str::<ListenerConfig>("bind = \"127.0.0.1:1\"\ntypo = 1").is_err());
}

// ------------------------------------------------------------ PROXY protocol

/// A v2 header written by hand from the specification (not by the parser's
/// own builder): signature, version 2 + command, family + STREAM, length,
/// addresses, then `tlv` bytes.
fn v2_header(proxy: bool, src: SocketAddr, dst: SocketAddr, tlv: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(if proxy { 0x21 } else { 0x20 });
    let mut addrs = Vec::new();
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            addrs.extend_from_slice(&s.ip().octets());
            addrs.extend_from_slice(&d.ip().octets());
            addrs.extend_from_slice(&s.port().to_be_bytes());
            addrs.extend_from_slice(&d.port().to_be_bytes());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            h.push(0x21);
            addrs.extend_from_slice(&s.ip().octets());
            addrs.extend_from_slice(&d.ip().octets());
            addrs.extend_from_slice(&s.port().to_be_bytes());
            addrs.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => panic!("mixed families"),
    }
    addrs.extend_from_slice(tlv);
    h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    h.extend_from_slice(&addrs);
    h
}

fn proxied(kind: ListenerKind) -> ListenerConfig {
    ListenerConfig { proxy_protocol: true, ..cfg(kind) }
}

/// Sends `header` and the first payload in one write (as a load balancer
/// does when the client spoke first), then checks the echo: not a byte of
/// the stream behind the header may be eaten.
async fn header_then_echo(running: &mut Running, header: &[u8]) -> Seen {
    let mut s = TcpStream::connect(running.addr).await.unwrap();
    let mut first = header.to_vec();
    first.extend_from_slice(b"\x10MQTT-bytes");
    within("write", s.write_all(&first)).await.unwrap();
    let mut got = [0u8; 11];
    within("read echo", s.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"\x10MQTT-bytes");
    echo_round_trip(&mut s, &[b"more"]).await;
    within("handler", running.seen.recv()).await.unwrap()
}

#[tokio::test]
async fn proxy_v1_and_v2_headers_give_the_client_address() {
    let mut running = start(Listener::bind(&proxied(ListenerKind::Tcp)).await.unwrap());
    let seen = header_then_echo(&mut running, b"PROXY TCP4 192.0.2.7 10.0.0.1 40001 1883\r\n").await;
    assert_eq!(seen.peer, "192.0.2.7:40001".parse().unwrap());
    let seen = header_then_echo(&mut running, b"PROXY TCP6 2001:db8::7 2001:db8::1 40002 1883\r\n").await;
    assert_eq!(seen.peer, "[2001:db8::7]:40002".parse().unwrap());

    let dst: SocketAddr = "10.0.0.1:1883".parse().unwrap();
    let v4 = v2_header(true, "198.51.100.9:50000".parse().unwrap(), dst, &[]);
    assert_eq!(header_then_echo(&mut running, &v4).await.peer, "198.51.100.9:50000".parse().unwrap());
    // TLVs (HAProxy may send some) are skipped.
    let with_tlv = v2_header(true, "198.51.100.10:50001".parse().unwrap(), dst, &[0x04, 0x00, 0x01, 0x00]);
    assert_eq!(header_then_echo(&mut running, &with_tlv).await.peer, "198.51.100.10:50001".parse().unwrap());
    let v6 =
        v2_header(true, "[2001:db8::9]:50002".parse().unwrap(), "[2001:db8::1]:1883".parse().unwrap(), &[]);
    assert_eq!(header_then_echo(&mut running, &v6).await.peer, "[2001:db8::9]:50002".parse().unwrap());

    // No client address in the header: the socket's own peer stands.
    let local = v2_header(false, "198.51.100.9:50000".parse().unwrap(), dst, &[]);
    assert!(header_then_echo(&mut running, &local).await.peer.ip().is_loopback());
    assert!(header_then_echo(&mut running, b"PROXY UNKNOWN\r\n").await.peer.ip().is_loopback());
    let unknown = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
    assert!(header_then_echo(&mut running, unknown).await.peer.ip().is_loopback());
}

#[tokio::test]
async fn a_header_split_over_many_writes_is_read_whole() {
    let mut running = start(Listener::bind(&proxied(ListenerKind::Tcp)).await.unwrap());
    for header in [
        b"PROXY TCP4 192.0.2.8 10.0.0.1 40003 1883\r\n".to_vec(),
        v2_header(true, "192.0.2.9:40004".parse().unwrap(), "10.0.0.1:1883".parse().unwrap(), &[]),
    ] {
        let mut s = TcpStream::connect(running.addr).await.unwrap();
        for chunk in header.chunks(7) {
            s.write_all(chunk).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        echo_round_trip(&mut s, &[b"after"]).await;
        let seen = within("handler", running.seen.recv()).await.unwrap();
        assert!(seen.peer.ip().to_string().starts_with("192.0.2."), "{seen:?}");
    }
}

#[tokio::test]
async fn proxy_header_before_tls() {
    let pki = Pki::new();
    let cfg = ListenerConfig { proxy_protocol: true, ..pki.listener_cfg(ListenerKind::Tls) };
    let mut running = start(Listener::bind(&cfg).await.unwrap());
    let mut tcp = TcpStream::connect(running.addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.5 10.0.0.1 41000 8883\r\n").await.unwrap();
    let connector = pki.connector(false);
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = within("tls", connector.connect(name, tcp)).await.unwrap();
    echo_round_trip(&mut tls, &[b"secure"]).await;
    let seen = within("handler", running.seen.recv()).await.unwrap();
    assert_eq!(seen.kind, ListenerKind::Tls);
    assert_eq!(seen.peer, "203.0.113.5:41000".parse().unwrap());
}

/// The connection is closed without reaching the handler.
async fn rejected(running: &mut Running, bytes: &[u8], then_close: bool) {
    let mut s = TcpStream::connect(running.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if then_close {
        s.shutdown().await.unwrap();
    }
    let mut buf = [0u8; 64];
    let r = within("closed", s.read(&mut buf)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "{:?}: {r:?}", String::from_utf8_lossy(bytes));
    assert!(running.seen.try_recv().is_err(), "{:?} reached the handler", String::from_utf8_lossy(bytes));
}

#[tokio::test]
async fn malformed_or_missing_headers_close_the_connection() {
    let listener = Listener::bind(&proxied(ListenerKind::Tcp))
        .await
        .unwrap()
        .with_handshake_timeout(Duration::from_millis(300));
    let mut running = start(listener);
    let dst: SocketAddr = "10.0.0.1:1883".parse().unwrap();
    let mut bad_version = v2_header(true, "192.0.2.1:1".parse().unwrap(), dst, &[]);
    bad_version[12] = 0x11;
    let mut bad_command = v2_header(true, "192.0.2.1:1".parse().unwrap(), dst, &[]);
    bad_command[12] = 0x2F;
    let mut short_addresses = v2_header(true, "192.0.2.1:1".parse().unwrap(), dst, &[]);
    short_addresses[15] = 4; // IPv4 needs 12 bytes
    short_addresses.truncate(20);
    let cases: Vec<Vec<u8>> = vec![
        // A client speaking MQTT straight to a PROXY listener.
        b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n".to_vec(),
        b"PROXY TCP4 192.0.2.1 10.0.0.1 99999 2\r\n".to_vec(),
        b"PROXY TCP5 192.0.2.1 10.0.0.1 1 2\r\n".to_vec(),
        // Longer than the 107 bytes v1 allows, no line end.
        [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat(),
        bad_version,
        bad_command,
        short_addresses,
    ];
    for case in &cases {
        rejected(&mut running, case, false).await;
    }
    // Truncated headers: the peer closes, or goes silent past the deadline.
    rejected(&mut running, b"PROXY TCP4 192.0.2.1", true).await;
    rejected(&mut running, b"PROXY TCP4 192.0.2.1", false).await;
    rejected(&mut running, b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc0", false).await;
    // The listener is unharmed.
    let seen = header_then_echo(&mut running, b"PROXY TCP4 192.0.2.7 10.0.0.1 40001 1883\r\n").await;
    assert_eq!(seen.peer, "192.0.2.7:40001".parse().unwrap());
}

#[tokio::test]
async fn without_the_setting_a_header_is_just_bytes() {
    let mut running = start(Listener::bind(&cfg(ListenerKind::Tcp)).await.unwrap());
    let mut s = TcpStream::connect(running.addr).await.unwrap();
    echo_round_trip(&mut s, &[b"PROXY TCP4 192.0.2.7 10.0.0.1 40001 1883\r\n"]).await;
    assert!(within("handler", running.seen.recv()).await.unwrap().peer.ip().is_loopback());
}

proptest::proptest! {
    /// Whatever the bytes, parsing answers (an address, none, or an error) and never panics.
    #[test]
    fn proxy_parsers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..128)) {
        let _ = proxy::parse_v1(&bytes);
        let _ = proxy::parse_v2(&bytes);
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        v2.extend_from_slice(&bytes);
        let _ = proxy::parse_v2(&v2);
        let mut v1 = b"PROXY ".to_vec();
        v1.extend_from_slice(&bytes);
        let _ = proxy::parse_v1(&v1);
    }
}

/// The kernel holds a new connection until its first bytes arrive
/// (TCP_DEFER_ACCEPT), so `accept` hands over a readable socket.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn listening_socket_defers_accept_until_data() {
    use std::os::fd::AsRawFd;
    let listener = Listener::bind(&cfg(ListenerKind::Tcp)).await.unwrap();
    let mut secs: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a live socket, and an out value of the size passed in `len`.
    let rc = unsafe {
        libc::getsockopt(
            listener.tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&mut secs as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
    assert!(secs > 0, "TCP_DEFER_ACCEPT is {secs}");
    // A client that speaks first is still served at once.
    let mut running = start(listener);
    let mut client = TcpStream::connect(running.addr).await.unwrap();
    echo_round_trip(&mut client, &[b"first bytes"]).await;
    within("handler", running.seen.recv()).await.unwrap();
}
