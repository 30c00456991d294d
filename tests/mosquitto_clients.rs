//! Interoperability with Mosquitto's own command-line clients (Debian's
//! mosquitto-clients) and password files made by `mosquitto_passwd`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::raw::*;
use common::{args, run_tool, Broker, BrokerCfg};
use tokio::io::{AsyncBufReadExt, BufReader};

const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

fn version_flag(v5: bool) -> &'static str {
    if v5 {
        "mqttv5"
    } else {
        "mqttv311"
    }
}

#[tokio::test]
async fn mosquitto_pub_all_qos_both_versions() {
    let b = Broker::start().await;
    let port = b.addr.port().to_string();
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("mp-sub")).await;
    s.sub("mp/#", 2).await;
    for v5 in [false, true] {
        for q in 0..=2u8 {
            let topic = format!("mp/{v5}/{q}");
            let (ok, _, err) = run_tool(
                "mosquitto_pub",
                &args(&[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    version_flag(v5),
                    "-q",
                    &q.to_string(),
                    "-t",
                    &topic,
                    "-m",
                    "hello",
                ]),
                TOOL_TIMEOUT,
            )
            .await;
            assert!(ok, "mosquitto_pub v5={v5} qos={q} failed: {err}");
            let m = s.expect_pub().await;
            assert_eq!((m.topic.as_str(), m.payload.as_slice(), m.qos), (topic.as_str(), &b"hello"[..], q));
            match q {
                1 => s.send(&puback(m.pid.unwrap_or(0))).await,
                2 => {
                    let pid = m.pid.unwrap_or(0);
                    s.send(&pubrec(pid)).await;
                    assert!(matches!(s.expect(WAIT).await, Pkt::PubRel { .. }));
                    s.send(&pubcomp(pid)).await;
                }
                _ => {}
            }
        }
    }
}

#[tokio::test]
async fn mosquitto_pub_v5_properties() {
    let b = Broker::start().await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("mpp-sub")).await;
    s.sub("mpp/t", 1).await;
    let (ok, _, err) = run_tool(
        "mosquitto_pub",
        &args(&[
            "-h",
            "127.0.0.1",
            "-p",
            &b.addr.port().to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "mpp/t",
            "-m",
            "{}",
            "-D",
            "PUBLISH",
            "user-property",
            "origin",
            "mosquitto",
            "-D",
            "PUBLISH",
            "content-type",
            "application/json",
            "-D",
            "PUBLISH",
            "response-topic",
            "mpp/reply",
            "-D",
            "PUBLISH",
            "correlation-data",
            "abc",
            "-D",
            "PUBLISH",
            "message-expiry-interval",
            "60",
        ]),
        TOOL_TIMEOUT,
    )
    .await;
    assert!(ok, "mosquitto_pub failed: {err}");
    let m = s.expect_pub().await;
    assert_eq!(m.props.users(), vec![("origin".to_string(), "mosquitto".to_string())]);
    assert_eq!(m.props.str_of(CONTENT_TYPE), Some("application/json"));
    assert_eq!(m.props.str_of(RESPONSE_TOPIC), Some("mpp/reply"));
    assert_eq!(m.props.bin_of(CORRELATION_DATA), Some(&b"abc"[..]));
    let left = m.props.u32_of(MESSAGE_EXPIRY).expect("message expiry");
    assert!((58..=60).contains(&left), "{left}");
}

/// mosquitto_sub receives a retained message on subscribe and then a live one.
async fn mosquitto_sub_receives(v5: bool) {
    let b = Broker::start().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "ms-pub")).await;
    let ready = format!("ms{v5}/ready");
    p.publish_acked(&Pub::new(&ready, b"r", 1).pid(1).retain(true)).await;
    let mut child = tokio::process::Command::new(common::mosquitto_tool("mosquitto_sub"))
        .args(args(&[
            "-h",
            "127.0.0.1",
            "-p",
            &b.addr.port().to_string(),
            "-V",
            version_flag(v5),
            "-q",
            "1",
            "-t",
            &format!("ms{v5}/#"),
            "-v",
            "-C",
            "2",
            "-W",
            "10",
        ]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mosquitto_sub");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(TOOL_TIMEOUT, lines.next_line()).await.expect("first line in time");
    assert_eq!(first.ok().flatten().as_deref(), Some(format!("{ready} r").as_str()), "retained on subscribe");
    p.publish_acked(&Pub::new(&format!("ms{v5}/live"), b"hello", 1).pid(2)).await;
    let second = tokio::time::timeout(TOOL_TIMEOUT, lines.next_line()).await.expect("second line in time");
    assert_eq!(second.ok().flatten().as_deref(), Some(format!("ms{v5}/live hello").as_str()));
    let status = tokio::time::timeout(TOOL_TIMEOUT, child.wait()).await.expect("exit").expect("wait");
    assert!(status.success());
}

#[tokio::test]
async fn mosquitto_sub_v311() {
    mosquitto_sub_receives(false).await;
}

#[tokio::test]
async fn mosquitto_sub_v5() {
    mosquitto_sub_receives(true).await;
}

#[tokio::test]
async fn mosquitto_passwd_file_with_mosquitto_pub() {
    let d = tempfile::tempdir().expect("tempdir");
    let f = d.path().join("passwd");
    common::mosquitto_passwd(&f, "carol", "pa55:word");
    let b = Broker::start_with(
        BrokerCfg::new()
            .mqtt("allow_anonymous = false")
            .mqtt(&format!("password_file = {}", common::toml_path(&f))),
    )
    .await;
    let port = b.addr.port().to_string();
    for v5 in [false, true] {
        let base = ["-h", "127.0.0.1", "-p", &port, "-V", version_flag(v5), "-t", "pw/t", "-m", "x"];
        let mut good = args(&base);
        good.extend(args(&["-u", "carol", "-P", "pa55:word"]));
        let (ok, _, err) = run_tool("mosquitto_pub", &good, TOOL_TIMEOUT).await;
        assert!(ok, "v5={v5}: right password refused: {err}");
        let mut bad = args(&base);
        bad.extend(args(&["-u", "carol", "-P", "nope"]));
        let (ok, _, _) = run_tool("mosquitto_pub", &bad, TOOL_TIMEOUT).await;
        assert!(!ok, "v5={v5}: wrong password accepted");
        let (ok, _, _) = run_tool("mosquitto_pub", &args(&base), TOOL_TIMEOUT).await;
        assert!(!ok, "v5={v5}: anonymous accepted with allow_anonymous = false");
    }
}

#[tokio::test]
async fn mosquitto_pub_over_tls() {
    let certs = common::make_certs();
    let d = tempfile::tempdir().expect("tempdir");
    for (n, c) in [
        ("ca.pem", &certs.ca_pem),
        ("server.pem", &certs.server_pem),
        ("server.key", &certs.server_key),
        ("client.pem", &certs.client_pem),
        ("client.key", &certs.client_key),
    ] {
        std::fs::write(d.path().join(n), c).expect("write");
    }
    let p = |n: &str| d.path().join(n).display().to_string();
    let cert_lines =
        [format!("cert_file = {:?}", p("server.pem")), format!("key_file = {:?}", p("server.key"))];
    let mtls_lines = [
        cert_lines[0].clone(),
        cert_lines[1].clone(),
        format!("client_ca_file = {:?}", p("ca.pem")),
        "require_client_cert = true".to_string(),
    ];
    let b = Broker::start_with(
        BrokerCfg::new()
            .listener("tls", "tls", &cert_lines.iter().map(|s| s.as_str()).collect::<Vec<_>>())
            .listener("mtls", "tls", &mtls_lines.iter().map(|s| s.as_str()).collect::<Vec<_>>()),
    )
    .await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("tls-sub")).await;
    s.sub("tlsm/#", 0).await;
    let tls_port = b.listener("tls").port().to_string();
    let mtls_port = b.listener("mtls").port().to_string();
    for v5 in [false, true] {
        let (ok, _, err) = run_tool(
            "mosquitto_pub",
            &args(&[
                "-h",
                "localhost",
                "-p",
                &tls_port,
                "--cafile",
                &p("ca.pem"),
                "-V",
                version_flag(v5),
                "-t",
                "tlsm/a",
                "-m",
                "over-tls",
            ]),
            TOOL_TIMEOUT,
        )
        .await;
        assert!(ok, "v5={v5}: mosquitto_pub --cafile failed: {err}");
        assert_eq!(s.expect_pub().await.payload, b"over-tls");
        let (ok, _, err) = run_tool(
            "mosquitto_pub",
            &args(&[
                "-h",
                "localhost",
                "-p",
                &mtls_port,
                "--cafile",
                &p("ca.pem"),
                "--cert",
                &p("client.pem"),
                "--key",
                &p("client.key"),
                "-V",
                version_flag(v5),
                "-t",
                "tlsm/b",
                "-m",
                "with-cert",
            ]),
            TOOL_TIMEOUT,
        )
        .await;
        assert!(ok, "v5={v5}: mosquitto_pub with a client certificate failed: {err}");
        assert_eq!(s.expect_pub().await.payload, b"with-cert");
        let (ok, _, _) = run_tool(
            "mosquitto_pub",
            &args(&[
                "-h",
                "localhost",
                "-p",
                &mtls_port,
                "--cafile",
                &p("ca.pem"),
                "-V",
                version_flag(v5),
                "-t",
                "tlsm/c",
                "-m",
                "no-cert",
            ]),
            TOOL_TIMEOUT,
        )
        .await;
        assert!(!ok, "v5={v5}: connection without a client certificate accepted");
    }
    s.expect_nothing(Duration::from_millis(200)).await;
}
