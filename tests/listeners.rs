//! Transports: TLS (server certificate, required client certificate),
//! WebSocket and secure WebSocket (subprotocol "mqtt"), each carrying both
//! protocol versions, and messages crossing transports.

mod common;

use std::time::Duration;

use common::raw::*;
use common::{Broker, BrokerCfg, Certs};

use futures_util::{SinkExt, StreamExt};

// The harness writes files into the broker's temp dir, whose path is not known
// when the TOML is written; so TLS tests keep the PEM files in their own temp dir.
struct CertDir {
    dir: tempfile::TempDir,
    certs: Certs,
}

impl CertDir {
    fn new() -> CertDir {
        let certs = common::make_certs();
        let dir = tempfile::tempdir().expect("tempdir");
        for (n, c) in [
            ("ca.pem", &certs.ca_pem),
            ("server.pem", &certs.server_pem),
            ("server.key", &certs.server_key),
            ("client.pem", &certs.client_pem),
            ("client.key", &certs.client_key),
            ("rogue.pem", &certs.rogue_client_pem),
            ("rogue.key", &certs.rogue_client_key),
        ] {
            std::fs::write(dir.path().join(n), c).expect("write pem");
        }
        CertDir { dir, certs }
    }
    fn p(&self, n: &str) -> String {
        self.dir.path().join(n).display().to_string()
    }
    fn cfg(
        &self,
        cfg: BrokerCfg,
        name: &str,
        kind: &str,
        client_cert: bool,
        path: Option<&str>,
    ) -> BrokerCfg {
        let mut extra = vec![
            format!("cert_file = {:?}", self.p("server.pem")),
            format!("key_file = {:?}", self.p("server.key")),
        ];
        if client_cert {
            extra.push(format!("client_ca_file = {:?}", self.p("ca.pem")));
            extra.push("require_client_cert = true".into());
        }
        if let Some(p) = path {
            extra.push(format!("path = {p:?}"));
        }
        let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        cfg.listener(name, kind, &extra)
    }
}

fn v4_opts(id: &str, host: &str, port: u16, transport: rumqttc::Transport) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(transport);
    o
}

fn v5_opts(id: &str, host: &str, port: u16, transport: rumqttc::Transport) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(transport);
    o
}

/// A v3.1.1 client over `transport` subscribes; a plain TCP client publishes; then the reverse.
async fn v4_round_trip(b: &Broker, host: &str, port: u16, transport: rumqttc::Transport, tag: &str) {
    let mut c = common::V4::start(v4_opts(&format!("{tag}-v4"), host, port, transport));
    c.connack().await;
    c.client.subscribe(format!("{tag}/in"), rumqttc::QoS::AtLeastOnce).await.expect("subscribe");
    c.suback().await;
    let (mut tcp, _) = RawClient::connect_ok(b.addr, &Conn::v3(&format!("{tag}-tcp4"))).await;
    tcp.sub(&format!("{tag}/out"), 1).await;
    tcp.publish_acked(&Pub::new(&format!("{tag}/in"), b"to-transport", 1).pid(1)).await;
    let m = c.publish().await;
    assert_eq!(m.payload.as_ref(), b"to-transport");
    c.client
        .publish(format!("{tag}/out"), rumqttc::QoS::AtLeastOnce, false, "from-transport")
        .await
        .expect("publish");
    let m = tcp.expect_pub().await;
    assert_eq!(m.payload, b"from-transport");
}

async fn v5_round_trip(b: &Broker, host: &str, port: u16, transport: rumqttc::Transport, tag: &str) {
    use rumqttc::v5::mqttbytes::QoS;
    let mut c = common::V5::start(v5_opts(&format!("{tag}-v5"), host, port, transport));
    c.connack().await;
    c.client.subscribe(format!("{tag}/in5"), QoS::AtLeastOnce).await.expect("subscribe");
    c.suback().await;
    let (mut tcp, _) = RawClient::connect_ok(b.addr, &Conn::v5(&format!("{tag}-tcp5"))).await;
    tcp.sub(&format!("{tag}/out5"), 1).await;
    tcp.publish_acked(&Pub::new(&format!("{tag}/in5"), b"to-transport", 1).pid(1)).await;
    let m = c.publish().await;
    assert_eq!(m.payload.as_ref(), b"to-transport");
    c.client
        .publish(format!("{tag}/out5"), QoS::AtLeastOnce, false, "from-transport")
        .await
        .expect("publish");
    let m = tcp.expect_pub().await;
    assert_eq!(m.payload, b"from-transport");
}

// ------------------------------------------------------------ TLS

#[tokio::test]
async fn tls_listener_v311_and_v5() {
    common::install_crypto_provider();
    let cd = CertDir::new();
    let b = Broker::start_with(cd.cfg(BrokerCfg::new(), "tls", "tls", false, None)).await;
    let a = b.listener("tls");
    let t = || rumqttc::Transport::tls(cd.certs.ca_pem.clone().into_bytes(), None, None);
    v4_round_trip(&b, "127.0.0.1", a.port(), t(), "tls").await;
    v5_round_trip(&b, "127.0.0.1", a.port(), t(), "tls").await;
}

#[tokio::test]
async fn tls_listener_refuses_plain_mqtt() {
    let cd = CertDir::new();
    let b = Broker::start_with(cd.cfg(BrokerCfg::new(), "tls", "tls", false, None)).await;
    let mut c = RawClient::tcp(b.listener("tls")).await;
    let _ = c.try_send(&Conn::v3("plain-on-tls").encode()).await;
    if let Recv::Packet(Pkt::ConnAck { .. }) = c.recv(Duration::from_secs(3)).await {
        panic!("plain MQTT accepted on the TLS port");
    }
    // The plain listener still serves.
    RawClient::connect_ok(b.addr, &Conn::v3("plain-ok")).await;
}

#[tokio::test]
async fn tls_client_certificate_required() {
    common::install_crypto_provider();
    let cd = CertDir::new();
    let b = Broker::start_with(cd.cfg(BrokerCfg::new(), "mtls", "tls", true, None)).await;
    let port = b.listener("mtls").port();
    let ca = cd.certs.ca_pem.clone().into_bytes();
    // With a certificate from the configured CA: accepted.
    let good = rumqttc::Transport::tls(
        ca.clone(),
        Some((cd.certs.client_pem.clone().into_bytes(), cd.certs.client_key.clone().into_bytes())),
        None,
    );
    v4_round_trip(&b, "127.0.0.1", port, good, "mtls").await;
    // Without a certificate, or with one from another CA: refused.
    for (label, auth) in [
        ("no client certificate", None),
        (
            "certificate from another CA",
            Some((
                cd.certs.rogue_client_pem.clone().into_bytes(),
                cd.certs.rogue_client_key.clone().into_bytes(),
            )),
        ),
    ] {
        let t = rumqttc::Transport::tls(ca.clone(), auth, None);
        let mut c = common::V4::start(v4_opts("mtls-bad", "127.0.0.1", port, t));
        let r = tokio::time::timeout(common::DEADLINE, async {
            loop {
                match c.events.recv().await {
                    Some(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => return Ok(a),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Err("ended".into()),
                }
            }
        })
        .await;
        match r {
            Ok(Ok(a)) if a.code == rumqttc::ConnectReturnCode::Success => {
                panic!("{label}: connection accepted")
            }
            _ => {}
        }
    }
}

// ------------------------------------------------------------ WebSocket

#[tokio::test]
async fn websocket_listener_v311_and_v5() {
    let b = Broker::start_with(BrokerCfg::new().listener("ws", "ws", &["path = \"/mqtt\""])).await;
    let port = b.listener("ws").port();
    let url = format!("ws://127.0.0.1:{port}/mqtt");
    v4_round_trip(&b, &url, port, rumqttc::Transport::Ws, "ws").await;
    v5_round_trip(&b, &url, port, rumqttc::Transport::Ws, "ws").await;
}

#[tokio::test]
async fn secure_websocket_listener_v311_and_v5() {
    common::install_crypto_provider();
    let cd = CertDir::new();
    let b = Broker::start_with(cd.cfg(BrokerCfg::new(), "wss", "wss", false, Some("/mqtt"))).await;
    let port = b.listener("wss").port();
    let url = format!("wss://127.0.0.1:{port}/mqtt");
    let t = || {
        rumqttc::Transport::Wss(rumqttc::TlsConfiguration::Simple {
            ca: cd.certs.ca_pem.clone().into_bytes(),
            alpn: None,
            client_auth: None,
        })
    };
    v4_round_trip(&b, &url, port, t(), "wss").await;
    v5_round_trip(&b, &url, port, t(), "wss").await;
}

async fn ws_connect(
    port: u16,
    path: &str,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    String,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://127.0.0.1:{port}{path}").into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().map_err(|_| "header".to_string())?);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    tokio_tungstenite::client_async(req, tcp).await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn websocket_packets_split_across_frames() {
    use tokio_tungstenite::tungstenite::Message;
    let b = Broker::start_with(BrokerCfg::new().listener("ws", "ws", &["path = \"/mqtt\""])).await;
    let port = b.listener("ws").port();
    let (mut ws, resp) = ws_connect(port, "/mqtt").await.expect("websocket handshake");
    assert_eq!(
        resp.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok()),
        Some("mqtt"),
        "subprotocol mqtt negotiated"
    );
    // CONNECT in two frames, then SUBSCRIBE + PUBLISH in one frame.
    let connect = Conn::v5("ws-split").encode();
    let (a, c) = connect.split_at(5);
    ws.send(Message::binary(a.to_vec())).await.expect("send");
    ws.send(Message::binary(c.to_vec())).await.expect("send");
    let mut both = subscribe(true, 1, &[("wsx/t", 0)], &[]);
    both.extend_from_slice(&Pub::new("wsx/t", b"self", 0).encode(true));
    ws.send(Message::binary(both)).await.expect("send");
    // Collect the byte stream and decode: CONNACK, SUBACK, PUBLISH.
    let mut buf = Vec::new();
    let mut pkts = Vec::new();
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    while pkts.len() < 3 {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("ws frames in time");
        match msg {
            Some(Ok(Message::Binary(d))) => buf.extend_from_slice(&d),
            Some(Ok(_)) => {}
            other => panic!("websocket ended: {other:?}"),
        }
        while let Some(p) = decode(&mut buf, true).expect("decode") {
            pkts.push(p);
        }
    }
    assert!(matches!(pkts[0], Pkt::ConnAck { code: 0, .. }), "{pkts:?}");
    assert!(matches!(pkts[1], Pkt::SubAck { .. }), "{pkts:?}");
    match &pkts[2] {
        Pkt::Publish(p) => assert_eq!(p.payload, b"self"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn websocket_wrong_path_refused() {
    let b = Broker::start_with(BrokerCfg::new().listener("ws", "ws", &["path = \"/mqtt\""])).await;
    let port = b.listener("ws").port();
    assert!(ws_connect(port, "/other").await.is_err(), "handshake on a wrong path must fail");
    assert!(ws_connect(port, "/mqtt").await.is_ok());
}

// ------------------------------------------------------------ admin HTTP of the real binary

#[tokio::test]
async fn admin_health_and_metrics() {
    let b = Broker::start().await;
    for path in ["/health/live", "/health/ready", "/metrics"] {
        let r = common::http_get(b.admin, path).await;
        assert!(matches!(r, Some((200, _))), "{path}: {r:?}");
    }
}
