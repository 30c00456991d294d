//! CONNECT / CONNACK, client ids, authentication, takeover, keep alive, wills,
//! AUTH, request/response information: MQTT 3.1.1 and 5.0 over real sockets.

mod common;

use std::time::Duration;

use common::raw::*;
use common::{Broker, BrokerCfg};
use tokio::time::Instant;

// ------------------------------------------------------------ basic CONNACK

#[tokio::test]
async fn connack_success_rumqttc_v311() {
    let b = Broker::start().await;
    let mut c = common::V4::connect(b.addr, "rumq-v4").await;
    c.client.subscribe("x/y", rumqttc::QoS::AtLeastOnce).await.expect("subscribe");
    let codes = c.suback().await;
    assert_eq!(codes, vec![rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)]);
}

#[tokio::test]
async fn connack_success_rumqttc_v5() {
    let b = Broker::start().await;
    let mut c = common::V5::connect(b.addr, "rumq-v5").await;
    c.client.subscribe("x/y", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.expect("subscribe");
    let codes = c.suback().await;
    assert_eq!(
        codes,
        vec![rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce
        )]
    );
}

#[tokio::test]
async fn connack_v5_properties_announce_limits() {
    let b = Broker::start_with(
        BrokerCfg::new()
            .mqtt("max_packet_size = 4096")
            .mqtt("receive_maximum = 7")
            .mqtt("topic_alias_maximum = 9"),
    )
    .await;
    let (_c, ack) = RawClient::connect(b.addr, &Conn::v5("props")).await;
    assert_eq!(connack_code(&ack), 0);
    let p = connack_props(&ack);
    assert_eq!(p.u32_of(MAXIMUM_PACKET_SIZE), Some(4096), "Maximum Packet Size in {p:?}");
    assert_eq!(p.u16_of(RECEIVE_MAXIMUM), Some(7), "Receive Maximum in {p:?}");
    assert_eq!(p.u16_of(TOPIC_ALIAS_MAXIMUM), Some(9), "Topic Alias Maximum in {p:?}");
    // Absent means "available"; when present these must say 1.
    for id in [RETAIN_AVAILABLE, WILDCARD_SUB_AVAILABLE, SUB_ID_AVAILABLE, SHARED_SUB_AVAILABLE] {
        if let Some(v) = p.u8_of(id) {
            assert_eq!(v, 1, "property {id:#x} in {p:?}");
        }
    }
    assert!(p.find(MAXIMUM_QOS).is_none() || p.u8_of(MAXIMUM_QOS) == Some(2), "{p:?}");
}

#[tokio::test]
async fn connack_v311_session_present_zero_on_clean() {
    let b = Broker::start().await;
    let (_c, ack) = RawClient::connect(b.addr, &Conn::v3("clean311")).await;
    assert_eq!(ack, Pkt::ConnAck { session_present: false, code: 0, props: vec![] });
}

// ------------------------------------------------------------ protocol version and first packet

#[tokio::test]
async fn bad_protocol_version_is_refused() {
    let b = Broker::start().await;
    let mut c = Conn::v3("badver");
    c.level = 6;
    let mut cl = RawClient::tcp(b.addr).await;
    cl.v5 = false;
    cl.send(&c.encode()).await;
    let got = cl.expect_closed(common::DEADLINE).await;
    // MQTT-3.1.2-2: CONNACK 0x01 (3.1.1 form) or 0x84 (5.0 form), then close.
    assert_eq!(got.len(), 1, "expected exactly one CONNACK before close, got {got:?}");
    let code = connack_code(&got[0]);
    assert!(code == 0x01 || code == 0x84, "CONNACK code {code:#x}");
    // Still serving.
    RawClient::connect_ok(b.addr, &Conn::v5("after-badver")).await;
}

#[tokio::test]
async fn bad_protocol_name_closes() {
    let b = Broker::start().await;
    let mut bytes = Conn::v3("badname").encode();
    // "MQTT" -> "MQTX"
    bytes[7] = b'X';
    let mut cl = RawClient::tcp(b.addr).await;
    cl.v5 = false;
    cl.send(&bytes).await;
    let got = cl.expect_closed(common::DEADLINE).await;
    for p in &got {
        let code = connack_code(p);
        assert!(code != 0, "bad protocol name accepted: {got:?}");
    }
}

#[tokio::test]
async fn first_packet_not_connect_closes() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let mut cl = RawClient::tcp(b.addr).await;
        cl.v5 = v5;
        cl.send(&pingreq()).await;
        let got = cl.expect_closed(common::DEADLINE).await;
        assert!(!got.contains(&Pkt::PingResp), "PINGREQ before CONNECT answered: {got:?}");
    }
}

#[tokio::test]
async fn second_connect_is_protocol_error_v5() {
    let b = Broker::start().await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v5("twice5")).await;
    c.send(&Conn::v5("twice5").encode()).await;
    let got = c.expect_closed(common::DEADLINE).await;
    assert!(
        matches!(got.as_slice(), [Pkt::Disconnect { code: 0x82, .. }]),
        "expected DISCONNECT 0x82 then close, got {got:?}"
    );
}

#[tokio::test]
async fn second_connect_closes_v311() {
    let b = Broker::start().await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v3("twice3")).await;
    c.send(&Conn::v3("twice3").encode()).await;
    let got = c.expect_closed(common::DEADLINE).await;
    assert!(got.is_empty(), "3.1.1 has no DISCONNECT from the server: {got:?}");
}

// ------------------------------------------------------------ client ids

#[tokio::test]
async fn empty_client_id_v5_gets_assigned_id() {
    let b = Broker::start().await;
    let (mut c, ack) = RawClient::connect(b.addr, &Conn::v5("")).await;
    assert_eq!(connack_code(&ack), 0);
    let p = connack_props(&ack);
    let id = p.str_of(ASSIGNED_CLIENT_ID).expect("Assigned Client Identifier in CONNACK");
    assert!(!id.is_empty());
    c.sub("assigned/t", 0).await;
    c.publish(&Pub::new("assigned/t", b"hi", 0)).await;
    let m = c.expect_pub().await;
    assert_eq!(m.payload, b"hi");
    // A second client gets a different id.
    let (_c2, ack2) = RawClient::connect(b.addr, &Conn::v5("")).await;
    let id2 = connack_props(&ack2).str_of(ASSIGNED_CLIENT_ID).map(str::to_string);
    assert_ne!(id2.as_deref(), Some(id));
}

#[tokio::test]
async fn empty_client_id_v311_clean_accepted() {
    let b = Broker::start().await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v3("")).await;
    c.ping().await;
}

#[tokio::test]
async fn empty_client_id_v311_persistent_rejected() {
    let b = Broker::start().await;
    let (mut c, ack) = RawClient::connect(b.addr, &Conn::v3("").clean(false)).await;
    assert_eq!(connack_code(&ack), 0x02, "identifier rejected");
    c.expect_closed(common::DEADLINE).await;
}

// ------------------------------------------------------------ authentication

fn passwd_broker_cfg(dir_file: &std::path::Path, anonymous: bool) -> BrokerCfg {
    BrokerCfg::new()
        .mqtt(&format!("allow_anonymous = {anonymous}"))
        .mqtt(&format!("password_file = {}", common::toml_path(dir_file)))
}

async fn passwd_broker(anonymous: bool) -> (Broker, tempfile::TempDir) {
    let d = tempfile::tempdir().expect("tempdir");
    let f = d.path().join("passwd");
    common::mosquitto_passwd(&f, "alice", "s3cret");
    let b = Broker::start_with(passwd_broker_cfg(&f, anonymous)).await;
    (b, d)
}

#[tokio::test]
async fn password_file_v311() {
    let (b, _d) = passwd_broker(false).await;
    let (mut ok, _) = RawClient::connect_ok(b.addr, &Conn::v3("a1").creds("alice", "s3cret")).await;
    ok.ping().await;
    let (mut bad, ack) = RawClient::connect(b.addr, &Conn::v3("a2").creds("alice", "wrong")).await;
    assert_eq!(connack_code(&ack), 0x04, "bad user name or password");
    bad.expect_closed(common::DEADLINE).await;
    let (mut unknown, ack) = RawClient::connect(b.addr, &Conn::v3("a3").creds("bob", "s3cret")).await;
    assert_eq!(connack_code(&ack), 0x04, "unknown user");
    unknown.expect_closed(common::DEADLINE).await;
    let (mut anon, ack) = RawClient::connect(b.addr, &Conn::v3("a4")).await;
    let code = connack_code(&ack);
    assert!(code == 0x05 || code == 0x04, "anonymous refused with 5 (or 4), got {code:#x}");
    anon.expect_closed(common::DEADLINE).await;
}

#[tokio::test]
async fn password_file_v5() {
    let (b, _d) = passwd_broker(false).await;
    let (mut ok, _) = RawClient::connect_ok(b.addr, &Conn::v5("b1").creds("alice", "s3cret")).await;
    ok.ping().await;
    let (mut bad, ack) = RawClient::connect(b.addr, &Conn::v5("b2").creds("alice", "wrong")).await;
    assert_eq!(connack_code(&ack), 0x86, "bad user name or password");
    bad.expect_closed(common::DEADLINE).await;
    let (mut anon, ack) = RawClient::connect(b.addr, &Conn::v5("b3")).await;
    let code = connack_code(&ack);
    assert!(code == 0x87 || code == 0x86, "anonymous refused with 0x87 (or 0x86), got {code:#x}");
    anon.expect_closed(common::DEADLINE).await;
}

#[tokio::test]
async fn password_file_with_anonymous_allowed() {
    let (b, _d) = passwd_broker(true).await;
    RawClient::connect_ok(b.addr, &Conn::v5("anon-ok")).await;
    let (_bad, ack) = RawClient::connect(b.addr, &Conn::v5("b2").creds("alice", "wrong")).await;
    assert_eq!(connack_code(&ack), 0x86, "a wrong password is refused even when anonymous is allowed");
}

#[tokio::test]
async fn rumqttc_v5_credentials() {
    let (b, _d) = passwd_broker(false).await;
    let mut o = rumqttc::v5::MqttOptions::new("rq-cred", "127.0.0.1", b.addr.port());
    o.set_credentials("alice", "s3cret");
    let mut c = common::V5::start(o);
    let ack = c.connack().await;
    assert_eq!(ack.code, rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success);
}

// ------------------------------------------------------------ takeover

#[tokio::test]
async fn session_takeover_v5_old_gets_0x8e() {
    let b = Broker::start().await;
    let (mut old, _) = RawClient::connect_ok(b.addr, &Conn::v5("dup-id")).await;
    let (mut new, _) = RawClient::connect_ok(b.addr, &Conn::v5("dup-id")).await;
    let got = old.expect_closed(common::DEADLINE).await;
    assert!(
        matches!(got.as_slice(), [Pkt::Disconnect { code: 0x8E, .. }]),
        "old connection: expected DISCONNECT 0x8E then close, got {got:?}"
    );
    new.ping().await;
}

#[tokio::test]
async fn session_takeover_v311_closes_old() {
    let b = Broker::start().await;
    let (mut old, _) = RawClient::connect_ok(b.addr, &Conn::v3("dup-id3")).await;
    let (mut new, _) = RawClient::connect_ok(b.addr, &Conn::v3("dup-id3")).await;
    let got = old.expect_closed(common::DEADLINE).await;
    assert!(got.is_empty(), "{got:?}");
    new.ping().await;
}

#[tokio::test]
async fn session_takeover_publishes_old_will() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let topic = format!("will/takeover/{v5}");
        let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5(&format!("ws{v5}"))).await;
        s.sub(&topic, 0).await;
        let id = format!("takeover-will-{v5}");
        let (_old, _) =
            RawClient::connect_ok(b.addr, &Conn::version(v5, &id).will(Will::new(&topic, b"gone"))).await;
        let (_new, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, &id)).await;
        let m = s.expect_pub().await;
        assert_eq!((m.topic.as_str(), m.payload.as_slice()), (topic.as_str(), &b"gone"[..]));
    }
}

#[tokio::test]
async fn takeover_keeps_persistent_session() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let id = format!("persist-takeover-{v5}");
        let c = Conn::version(v5, &id).clean(false).expiry(60);
        let (_old, sp) = RawClient::connect_ok(b.addr, &c).await;
        assert!(!sp);
        let (_new, sp) = RawClient::connect_ok(b.addr, &c).await;
        assert!(sp, "v5={v5}: takeover of a persistent session must report session present");
    }
}

// ------------------------------------------------------------ keep alive

async fn keepalive_closes(v5: bool) {
    let b = Broker::start().await;
    let topic = format!("will/ka/{v5}");
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5(&format!("ka-watch-{v5}"))).await;
    s.sub(&topic, 1).await;
    let (mut c, _) = RawClient::connect_ok(
        b.addr,
        &Conn::version(v5, &format!("ka-{v5}")).keep_alive(1).will(Will::new(&topic, b"ka-dead").qos(1)),
    )
    .await;
    let start = Instant::now();
    let got = c.expect_closed(Duration::from_secs(4)).await;
    let elapsed = start.elapsed();
    // 1.5 x 1 s plus a margin for timer granularity and a loaded machine.
    assert!(elapsed <= Duration::from_millis(2700), "closed only after {elapsed:?}");
    assert!(elapsed >= Duration::from_millis(900), "closed too early: {elapsed:?}");
    if v5 {
        assert!(
            matches!(got.as_slice(), [Pkt::Disconnect { code: 0x8D, .. }]),
            "expected DISCONNECT 0x8D (keep alive timeout), got {got:?}"
        );
    } else {
        assert!(got.is_empty(), "{got:?}");
    }
    let m = s.expect_pub().await;
    assert_eq!(m.payload, b"ka-dead", "will after keep-alive timeout");
}

#[tokio::test]
async fn keepalive_timeout_v311() {
    keepalive_closes(false).await;
}

#[tokio::test]
async fn keepalive_timeout_v5() {
    keepalive_closes(true).await;
}

#[tokio::test]
async fn keepalive_kept_by_pings() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "pinger").keep_alive(1)).await;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(3000) {
            c.ping().await;
            // Waiting between pings is the behaviour under test (a client idle for 0.5 s).
            match c.recv(Duration::from_millis(500)).await {
                Recv::Timeout => {}
                other => panic!("unexpected while pinging: {other:?}"),
            }
        }
        c.ping().await;
    }
}

#[tokio::test]
async fn server_keep_alive_v5() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("max_keep_alive = 1")).await;
    let (mut c, ack) = RawClient::connect(b.addr, &Conn::v5("ska").keep_alive(60)).await;
    assert_eq!(connack_code(&ack), 0);
    let p = connack_props(&ack);
    assert_eq!(p.u16_of(SERVER_KEEP_ALIVE), Some(1), "Server Keep Alive in {p:?}");
    // And the server enforces its own value.
    let start = Instant::now();
    c.expect_closed(Duration::from_secs(4)).await;
    assert!(start.elapsed() <= Duration::from_millis(2700), "closed after {:?}", start.elapsed());
}

#[tokio::test]
async fn server_keep_alive_absent_when_within_limit() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("max_keep_alive = 100")).await;
    let (_c, ack) = RawClient::connect(b.addr, &Conn::v5("ska2").keep_alive(60)).await;
    let p = connack_props(&ack);
    assert!(p.u16_of(SERVER_KEEP_ALIVE).is_none() || p.u16_of(SERVER_KEEP_ALIVE) == Some(60), "{p:?}");
}

// ------------------------------------------------------------ wills

async fn will_watcher(b: &Broker, topic: &str) -> RawClient {
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5(&format!("watch-{topic}"))).await;
    s.sub(topic, 2).await;
    s
}

#[tokio::test]
async fn will_on_abnormal_close() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let topic = format!("will/abn/{v5}");
        let mut s = will_watcher(&b, &topic).await;
        let (c, _) = RawClient::connect_ok(
            b.addr,
            &Conn::version(v5, &format!("abn-{v5}")).will(Will::new(&topic, b"bye").qos(1)),
        )
        .await;
        drop(c); // TCP close without DISCONNECT
        let m = s.expect_pub().await;
        assert_eq!(m.topic, topic);
        assert_eq!(m.payload, b"bye");
        assert_eq!(m.qos, 1);
    }
}

#[tokio::test]
async fn no_will_on_normal_disconnect() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let topic = format!("will/normal/{v5}");
        let mut s = will_watcher(&b, &topic).await;
        let (c, _) = RawClient::connect_ok(
            b.addr,
            &Conn::version(v5, &format!("normal-{v5}")).will(Will::new(&topic, b"should-not")),
        )
        .await;
        c.disconnect().await;
        s.expect_nothing(Duration::from_millis(700)).await;
    }
}

#[tokio::test]
async fn will_on_disconnect_0x04() {
    let b = Broker::start().await;
    let topic = "will/x04";
    let mut s = will_watcher(&b, topic).await;
    let (mut c, _) =
        RawClient::connect_ok(b.addr, &Conn::v5("x04").will(Will::new(topic, b"with-will"))).await;
    c.send(&disconnect(Some(0x04), &[])).await;
    let m = s.expect_pub().await;
    assert_eq!(m.payload, b"with-will");
}

#[tokio::test]
async fn will_properties_carried() {
    let b = Broker::start().await;
    let topic = "will/props";
    let mut s = will_watcher(&b, topic).await;
    let w = Will::new(topic, b"{\"x\":1}")
        .prop(Prop::Byte(PAYLOAD_FORMAT, 1))
        .prop(Prop::Str(CONTENT_TYPE, "application/json".into()))
        .prop(Prop::Str(RESPONSE_TOPIC, "reply/here".into()))
        .prop(Prop::Bin(CORRELATION_DATA, vec![1, 2, 3]))
        .prop(Prop::user("k", "v1"))
        .prop(Prop::user("k", "v2"));
    let (c, _) = RawClient::connect_ok(b.addr, &Conn::v5("wprops").will(w)).await;
    drop(c);
    let m = s.expect_pub().await;
    assert_eq!(m.props.u8_of(PAYLOAD_FORMAT), Some(1), "{:?}", m.props);
    assert_eq!(m.props.str_of(CONTENT_TYPE), Some("application/json"));
    assert_eq!(m.props.str_of(RESPONSE_TOPIC), Some("reply/here"));
    assert_eq!(m.props.bin_of(CORRELATION_DATA), Some(&[1u8, 2, 3][..]));
    assert_eq!(m.props.users(), vec![("k".into(), "v1".into()), ("k".into(), "v2".into())]);
}

#[tokio::test]
async fn will_retained_flag() {
    let b = Broker::start().await;
    let topic = "will/retained";
    let mut w = Will::new(topic, b"retained-will");
    w.retain = true;
    // A watcher sees the will published live, so the late subscribers below
    // come after it: one subscribed before the will would get a live copy
    // (retain 0 without Retain As Published), not the retained one.
    let (mut watcher, _) = RawClient::connect_ok(b.addr, &Conn::v5("wret-watch")).await;
    watcher.send(&subscribe(true, 1, &[(topic, 0)], &[])).await;
    let _ = watcher.expect(common::DEADLINE).await; // SUBACK
    let (c, _) = RawClient::connect_ok(b.addr, &Conn::v3("wret").will(w)).await;
    drop(c);
    assert_eq!(watcher.expect_pub().await.payload, b"retained-will");
    // A subscriber arriving later gets the will as the retained message.
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("wret-late")).await;
        s.send(&subscribe(true, 1, &[(topic, 0)], &[])).await;
        let _ = s.expect(common::DEADLINE).await; // SUBACK
        match s.recv(Duration::from_millis(300)).await {
            Recv::Packet(Pkt::Publish(m)) => {
                assert!(m.retain);
                assert_eq!(m.payload, b"retained-will");
                return;
            }
            other => {
                assert!(Instant::now() < deadline, "no retained will: {other:?}");
            }
        }
    }
}

#[tokio::test]
async fn will_delay_sent_after_delay() {
    let b = Broker::start().await;
    let topic = "will/delay";
    let mut s = will_watcher(&b, topic).await;
    let (c, _) = RawClient::connect_ok(
        b.addr,
        &Conn::v5("wdelay").expiry(30).will(Will::new(topic, b"late").prop(Prop::U32(WILL_DELAY, 2))),
    )
    .await;
    let start = Instant::now();
    drop(c);
    let m = match s.recv(Duration::from_secs(5)).await {
        Recv::Packet(Pkt::Publish(m)) => m,
        other => panic!("no delayed will: {other:?}"),
    };
    let e = start.elapsed();
    assert_eq!(m.payload, b"late");
    assert!(e >= Duration::from_millis(1800), "will sent after {e:?}, before its 2 s delay");
    assert!(e <= Duration::from_millis(3800), "will sent only after {e:?}");
}

#[tokio::test]
async fn will_delay_cancelled_by_reconnect() {
    let b = Broker::start().await;
    let topic = "will/cancel";
    let mut s = will_watcher(&b, topic).await;
    let conn = Conn::v5("wcancel")
        .clean(false)
        .expiry(30)
        .will(Will::new(topic, b"never").prop(Prop::U32(WILL_DELAY, 1)));
    let (c, _) = RawClient::connect_ok(b.addr, &conn).await;
    drop(c);
    let (_c2, sp) = RawClient::connect_ok(b.addr, &conn).await;
    assert!(sp, "session present on resume");
    s.expect_nothing(Duration::from_millis(2200)).await;
}

#[tokio::test]
async fn will_delay_longer_than_session_expiry_sent_at_session_end() {
    let b = Broker::start().await;
    let topic = "will/sessend";
    let mut s = will_watcher(&b, topic).await;
    let (c, _) = RawClient::connect_ok(
        b.addr,
        &Conn::v5("wsessend").expiry(1).will(Will::new(topic, b"end").prop(Prop::U32(WILL_DELAY, 30))),
    )
    .await;
    let start = Instant::now();
    drop(c);
    let m = match s.recv(Duration::from_secs(5)).await {
        Recv::Packet(Pkt::Publish(m)) => m,
        other => panic!("will not sent at session end: {other:?}"),
    };
    assert_eq!(m.payload, b"end");
    assert!(start.elapsed() >= Duration::from_millis(800), "sent after {:?}", start.elapsed());
}

// ------------------------------------------------------------ AUTH, request/response

#[tokio::test]
async fn connect_with_auth_method_is_refused_0x8c() {
    let b = Broker::start().await;
    let (mut c, ack) =
        RawClient::connect(b.addr, &Conn::v5("scram").prop(Prop::Str(AUTH_METHOD, "SCRAM-SHA-1".into())))
            .await;
    assert_eq!(connack_code(&ack), 0x8C, "bad authentication method");
    c.expect_closed(common::DEADLINE).await;
}

#[tokio::test]
async fn auth_packet_after_connect_is_refused() {
    let b = Broker::start().await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v5("authpkt")).await;
    c.send(&auth(0x18, &[Prop::Str(AUTH_METHOD, "SCRAM-SHA-1".into())])).await;
    let got = c.expect_closed(common::DEADLINE).await;
    assert!(
        matches!(got.as_slice(), [Pkt::Disconnect { code: 0x8C, .. }] | [Pkt::Disconnect { code: 0x82, .. }]),
        "expected DISCONNECT 0x8C (or 0x82) then close, got {got:?}"
    );
}

#[tokio::test]
async fn request_response_information() {
    let b = Broker::start().await;
    let (_c, ack) =
        RawClient::connect(b.addr, &Conn::v5("rri").prop(Prop::Byte(REQUEST_RESPONSE_INFO, 1))).await;
    let p = connack_props(&ack);
    let info = p.str_of(RESPONSE_INFO).expect("Response Information when requested");
    assert!(!info.is_empty());
    let (_c, ack) = RawClient::connect(b.addr, &Conn::v5("rri0")).await;
    assert!(connack_props(&ack).find(RESPONSE_INFO).is_none(), "Response Information not requested");
}

#[tokio::test]
async fn request_response_round_trip() {
    // Requester publishes with Response Topic + Correlation Data; responder answers on it.
    let b = Broker::start().await;
    let (mut responder, _) = RawClient::connect_ok(b.addr, &Conn::v5("responder")).await;
    responder.sub("svc/req", 1).await;
    let (mut requester, _) = RawClient::connect_ok(b.addr, &Conn::v5("requester")).await;
    requester.sub("svc/resp/requester", 1).await;
    requester
        .publish_acked(
            &Pub::new("svc/req", b"ping", 1)
                .pid(9)
                .prop(Prop::Str(RESPONSE_TOPIC, "svc/resp/requester".into()))
                .prop(Prop::Bin(CORRELATION_DATA, b"corr-1".to_vec())),
        )
        .await;
    let req = responder.expect_pub().await;
    responder.send(&puback(req.pid.unwrap_or(0))).await;
    let rt = req.props.str_of(RESPONSE_TOPIC).expect("response topic").to_string();
    let cd = req.props.bin_of(CORRELATION_DATA).expect("correlation data").to_vec();
    responder.publish_acked(&Pub::new(&rt, b"pong", 1).pid(2).prop(Prop::Bin(CORRELATION_DATA, cd))).await;
    let resp = requester.expect_pub().await;
    assert_eq!(resp.payload, b"pong");
    assert_eq!(resp.props.bin_of(CORRELATION_DATA), Some(&b"corr-1"[..]));
}

// ------------------------------------------------------------ invalid CONNECT packets

#[tokio::test]
async fn invalid_connect_packets_refused() {
    let mut b = Broker::start().await;
    let mut failures = Vec::new();
    for v5 in [false, true] {
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut reserved = Conn::version(v5, "rsv").encode();
        // Connect flags are at offset 9 (fixed header 2 bytes, "MQTT" 6, level 1).
        reserved[9] |= 0x01;
        cases.push(("reserved connect flag set", reserved));
        let mut will_qos3 = Conn::version(v5, "wq3").will(Will::new("w/t", b"x")).encode();
        will_qos3[9] |= 0x18;
        cases.push(("will QoS 3", will_qos3));
        let mut will_retain_no_will = Conn::version(v5, "wr").encode();
        will_retain_no_will[9] |= 0x20;
        cases.push(("will retain without will flag", will_retain_no_will));
        let mut pw_no_user = Conn::version(v5, "pnu").encode();
        if !v5 {
            // 3.1.1: password flag without user name flag is malformed (MQTT-3.1.2-22).
            pw_no_user[9] |= 0x40;
            pw_no_user.extend_from_slice(&[0x00, 0x01, b'p']);
            pw_no_user[1] += 3;
            cases.push(("password without user name (3.1.1)", pw_no_user));
        }
        if v5 {
            cases.push(("Receive Maximum 0", Conn::v5("rm0").prop(Prop::U16(RECEIVE_MAXIMUM, 0)).encode()));
            cases.push((
                "Maximum Packet Size 0",
                Conn::v5("mps0").prop(Prop::U32(MAXIMUM_PACKET_SIZE, 0)).encode(),
            ));
            cases.push(("Session Expiry Interval twice", Conn::v5("se2").expiry(1).expiry(2).encode()));
            cases.push((
                "Request Problem Information 2",
                Conn::v5("rpi2").prop(Prop::Byte(REQUEST_PROBLEM_INFO, 2)).encode(),
            ));
        }
        for (name, bytes) in cases {
            let mut c = RawClient::tcp(b.addr).await;
            c.v5 = v5;
            c.send(&bytes).await;
            match c.closed_within(common::DEADLINE).await {
                None => failures.push(format!("v5={v5} {name}: connection left open")),
                Some(got) => match got.as_slice() {
                    [] => {}
                    [Pkt::ConnAck { code, .. }] if v5 && (*code == 0x81 || *code == 0x82) => {}
                    [Pkt::ConnAck { code, .. }] if !v5 && *code != 0 => {}
                    other => failures.push(format!(
                        "v5={v5} {name}: expected close (v5: CONNACK 0x81/0x82), got {other:?}"
                    )),
                },
            }
            assert!(b.alive(), "broker died on {name}");
        }
    }
    RawClient::connect_ok(b.addr, &Conn::v5("after-invalid")).await;
    assert!(failures.is_empty(), "{} case(s) wrong:\n{}", failures.len(), failures.join("\n"));
}

// ------------------------------------------------------------ server shutdown

#[tokio::test]
async fn shutdown_sends_server_shutting_down() {
    let mut b = Broker::start().await;
    let (mut c5, _) = RawClient::connect_ok(b.addr, &Conn::v5("sd5")).await;
    let (mut c3, _) = RawClient::connect_ok(b.addr, &Conn::v3("sd3")).await;
    b.terminate();
    let got = c5.expect_closed(Duration::from_secs(10)).await;
    assert!(
        matches!(got.as_slice(), [Pkt::Disconnect { code: 0x8B, .. }]),
        "v5 client: expected DISCONNECT 0x8B (server shutting down), got {got:?}"
    );
    let got = c3.expect_closed(Duration::from_secs(10)).await;
    assert!(got.is_empty(), "{got:?}");
    let status = b.wait_exit(Duration::from_secs(10)).await;
    assert!(status.is_some(), "broker did not exit within 10 s of SIGTERM");
}

#[tokio::test]
async fn will_on_abnormal_close_persistent_session() {
    // Persistent sessions keep their will in the replicated state: same behaviour.
    let b = Broker::start().await;
    for v5 in [false, true] {
        let topic = format!("will/persist/{v5}");
        let mut s = will_watcher(&b, &topic).await;
        let mut conn =
            Conn::version(v5, &format!("pw-{v5}")).clean(false).will(Will::new(&topic, b"p-bye").qos(1));
        if v5 {
            conn = conn.expiry(60);
        }
        let (c, _) = RawClient::connect_ok(b.addr, &conn).await;
        drop(c);
        let m = s.expect_pub().await;
        assert_eq!(m.payload, b"p-bye", "v5={v5}");
        // And a normal DISCONNECT of a persistent session sends none.
        let (c, _) = RawClient::connect_ok(b.addr, &conn).await;
        c.disconnect().await;
        s.expect_nothing(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn keep_alive_zero_is_never_timed_out() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("max_keep_alive = 65535")).await;
    let (mut c, ack) = RawClient::connect(b.addr, &Conn::v5("ka0").keep_alive(0)).await;
    assert_eq!(connack_code(&ack), 0);
    // Idle for longer than any short timeout would allow.
    c.expect_nothing(Duration::from_millis(2500)).await;
    c.ping().await;
}
