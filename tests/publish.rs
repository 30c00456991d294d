//! PUBLISH in both directions: QoS 0/1/2 and the QoS 2 handshake, exactly
//! once, Receive Maximum both ways, topic aliases, message expiry, property
//! pass-through, interop with rumqttc.

mod common;

use std::time::Duration;

use common::raw::*;
use common::{Broker, BrokerCfg};

/// Receives one PUBLISH and does the subscriber side of its QoS handshake
/// (PUBRELs that arrive later are answered by the next call).
async fn recv_and_ack(c: &mut RawClient) -> Pub {
    c.recv_pub_auto().await
}

async fn qos_matrix(v5: bool) {
    let b = Broker::start().await;
    let mut subs = Vec::new();
    for q in 0..=2u8 {
        let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, &format!("sub-q{q}"))).await;
        s.sub("qos/t", q).await;
        subs.push(s);
    }
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "pub")).await;
    for pq in 0..=2u8 {
        let payload = format!("m{pq}");
        p.publish_acked(&Pub::new("qos/t", payload.as_bytes(), pq).pid(10 + pq as u16)).await;
        for (sq, s) in subs.iter_mut().enumerate() {
            let m = recv_and_ack(s).await;
            assert_eq!(m.payload, payload.as_bytes());
            assert_eq!(m.topic, "qos/t");
            assert_eq!(m.qos, pq.min(sq as u8), "pub qos {pq}, sub qos {sq}");
            assert!(!m.dup);
            assert!(!m.retain);
            assert_eq!(m.pid.is_some(), m.qos > 0);
        }
    }
}

#[tokio::test]
async fn qos_levels_v311() {
    qos_matrix(false).await;
}

#[tokio::test]
async fn qos_levels_v5() {
    qos_matrix(true).await;
}

async fn qos2_exactly_once_in(v5: bool) {
    let b = Broker::start().await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "eo-sub")).await;
    s.sub("eo/t", 2).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "eo-pub")).await;
    let msg = Pub::new("eo/t", b"once", 2).pid(7);
    p.publish(&msg).await;
    assert!(matches!(p.expect(WAIT).await, Pkt::PubRec { pid: 7, .. }));
    // The publisher did not see PUBREC (say) and resends with DUP before PUBREL.
    p.publish(&msg.clone().dup(true)).await;
    assert!(matches!(p.expect(WAIT).await, Pkt::PubRec { pid: 7, .. }));
    p.send(&pubrel(7)).await;
    assert!(matches!(p.expect(WAIT).await, Pkt::PubComp { pid: 7, code: 0, .. }));
    let m = recv_and_ack(&mut s).await;
    assert_eq!(m.payload, b"once");
    // After PUBREL the id is free: the same id carries a new message.
    p.publish_acked(&Pub::new("eo/t", b"second", 2).pid(7)).await;
    let m2 = recv_and_ack(&mut s).await;
    assert_eq!(m2.payload, b"second", "the duplicate of 'once' must not be delivered again");
}

#[tokio::test]
async fn qos2_exactly_once_inbound_v311() {
    qos2_exactly_once_in(false).await;
}

#[tokio::test]
async fn qos2_exactly_once_inbound_v5() {
    qos2_exactly_once_in(true).await;
}

#[tokio::test]
async fn qos2_outbound_handshake_waits_for_pubrec_and_pubcomp() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "q2out-sub")).await;
        s.sub("q2out/t", 2).await;
        let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "q2out-pub")).await;
        p.publish_acked(&Pub::new("q2out/t", b"a", 2).pid(1)).await;
        let m = s.expect_pub().await;
        assert_eq!(m.qos, 2);
        let pid = m.pid.expect("pid");
        s.send(&pubrec(pid)).await;
        match s.expect(WAIT).await {
            Pkt::PubRel { pid: got, .. } => assert_eq!(got, pid),
            other => panic!("expected PUBREL, got {other:?}"),
        }
        s.send(&pubcomp(pid)).await;
        p.publish_acked(&Pub::new("q2out/t", b"b", 2).pid(2)).await;
        let m2 = recv_and_ack(&mut s).await;
        assert_eq!(m2.payload, b"b");
        assert_ne!(m2.pid, None);
    }
}

#[tokio::test]
async fn pubrel_unknown_id() {
    let b = Broker::start().await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v5("relunk")).await;
    c.send(&pubrel(4242)).await;
    match c.expect(WAIT).await {
        Pkt::PubComp { pid: 4242, code, .. } => assert_eq!(code, 0x92, "packet identifier not found"),
        other => panic!("expected PUBCOMP 0x92, got {other:?}"),
    }
    let (mut c3, _) = RawClient::connect_ok(b.addr, &Conn::v3("relunk3")).await;
    c3.send(&pubrel(4243)).await;
    match c3.expect(WAIT).await {
        Pkt::PubComp { pid: 4243, .. } => {}
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

#[tokio::test]
async fn qos1_puback_v5_no_subscribers_reason() {
    // 0x10 "No matching subscribers" is allowed, 0x00 too; never an error code.
    let b = Broker::start().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("nosub")).await;
    p.publish(&Pub::new("nobody/listens", b"x", 1).pid(5)).await;
    match p.expect(WAIT).await {
        Pkt::PubAck { pid: 5, code, .. } => assert!(code == 0 || code == 0x10, "{code:#x}"),
        other => panic!("{other:?}"),
    }
}

// ------------------------------------------------------------ rumqttc interop

#[tokio::test]
async fn rumqttc_v311_pub_sub_all_qos() {
    let b = Broker::start().await;
    let mut s = common::V4::connect(b.addr, "rq4-sub").await;
    s.client.subscribe("rq4/#", rumqttc::QoS::ExactlyOnce).await.expect("sub");
    s.suback().await;
    let p = common::V4::connect(b.addr, "rq4-pub").await;
    for (i, q) in [rumqttc::QoS::AtMostOnce, rumqttc::QoS::AtLeastOnce, rumqttc::QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        p.client.publish(format!("rq4/{i}"), q, false, format!("p{i}")).await.expect("publish");
        let m = s.publish().await;
        assert_eq!(m.topic, format!("rq4/{i}"));
        assert_eq!(m.payload.as_ref(), format!("p{i}").as_bytes());
        assert_eq!(m.qos, q);
    }
}

#[tokio::test]
async fn rumqttc_v5_pub_sub_all_qos() {
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::start().await;
    let mut s = common::V5::connect(b.addr, "rq5-sub").await;
    s.client.subscribe("rq5/#", QoS::ExactlyOnce).await.expect("sub");
    s.suback().await;
    let p = common::V5::connect(b.addr, "rq5-pub").await;
    for (i, q) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
        p.client.publish(format!("rq5/{i}"), q, false, format!("p{i}")).await.expect("publish");
        let m = s.publish().await;
        assert_eq!(m.topic.as_ref(), format!("rq5/{i}").as_bytes());
        assert_eq!(m.payload.as_ref(), format!("p{i}").as_bytes());
        assert_eq!(m.qos, q);
    }
}

#[tokio::test]
async fn v311_and_v5_clients_interoperate() {
    let b = Broker::start().await;
    let (mut s3, _) = RawClient::connect_ok(b.addr, &Conn::v3("mix3")).await;
    s3.sub("mix/t", 1).await;
    let (mut s5, _) = RawClient::connect_ok(b.addr, &Conn::v5("mix5")).await;
    s5.sub("mix/t", 1).await;
    let (mut p5, _) = RawClient::connect_ok(b.addr, &Conn::v5("mixp")).await;
    p5.publish_acked(&Pub::new("mix/t", b"x", 1).pid(1).prop(Prop::user("a", "b"))).await;
    let m3 = recv_and_ack(&mut s3).await;
    assert_eq!(m3.payload, b"x");
    let m5 = recv_and_ack(&mut s5).await;
    assert_eq!(m5.props.users(), vec![("a".into(), "b".into())]);
}

// ------------------------------------------------------------ Receive Maximum

#[tokio::test]
async fn receive_maximum_inbound_exceeded_v5() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("receive_maximum = 2")).await;
    let (mut c, ack) = RawClient::connect(b.addr, &Conn::v5("rmin")).await;
    assert_eq!(connack_props(&ack).u16_of(RECEIVE_MAXIMUM), Some(2));
    // QoS 2 publishes stay unacknowledged until PUBCOMP: never send PUBREL.
    for pid in 1..=2u16 {
        c.publish(&Pub::new("rmin/t", b"x", 2).pid(pid)).await;
        assert!(matches!(c.expect(WAIT).await, Pkt::PubRec { .. }));
    }
    c.publish(&Pub::new("rmin/t", b"x", 2).pid(3)).await;
    let got = c.expect_closed(common::DEADLINE).await;
    assert!(
        got.iter().any(|p| matches!(p, Pkt::Disconnect { code: 0x93, .. })),
        "expected DISCONNECT 0x93 (Receive Maximum exceeded), got {got:?}"
    );
}

/// The broker's `raftmq_connections_open` gauge.
async fn connections_open(b: &Broker) -> Option<u64> {
    let (_, body) = common::http_get(b.admin, "/metrics").await?;
    body.lines().find_map(|l| l.strip_prefix("raftmq_connections_open ")?.trim().parse().ok())
}

/// After its DISCONNECT 0x93 the broker still reads what the client sends: a
/// client acknowledging the PUBRECs it read before the DISCONNECT (as the Paho
/// interoperability client does) must not get its connection reset. Once the
/// broker has let go of the socket, a reset would already be back: the
/// client's next write would fail (EPIPE/ECONNRESET).
#[tokio::test]
async fn receive_maximum_exceeded_late_acks_no_reset_v5() {
    if common::against_mosquitto() {
        return; // Mosquitto 2.0.11 sends no DISCONNECT 0x93; no admin metrics either.
    }
    let b = Broker::start_with(BrokerCfg::new().mqtt("receive_maximum = 2")).await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v5("rmlate")).await;
    for pid in 1..=3u16 {
        c.publish(&Pub::new("rmlate/t", b"x", 2).pid(pid)).await;
    }
    let got = c.expect_closed(common::DEADLINE).await;
    assert!(
        got.iter().any(|p| matches!(p, Pkt::Disconnect { code: 0x93, .. })),
        "expected DISCONNECT 0x93 (Receive Maximum exceeded), got {got:?}"
    );
    // The late acknowledgements of the two PUBRECs.
    for pid in 1..=2u16 {
        assert!(c.try_send(&pubrel(pid)).await, "late PUBREL {pid} failed");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while connections_open(&b).await != Some(0) {
        assert!(tokio::time::Instant::now() < deadline, "the broker kept the connection open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c.try_send(&pingreq()).await, "the broker reset the connection after its DISCONNECT");
}

#[tokio::test]
async fn receive_maximum_outbound_respected_v5() {
    let b = Broker::start().await;
    let (mut s, _) =
        RawClient::connect_ok(b.addr, &Conn::v5("rmout").prop(Prop::U16(RECEIVE_MAXIMUM, 2))).await;
    s.sub("rmout/t", 1).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("rmout-pub")).await;
    for i in 0..5u16 {
        p.publish_acked(&Pub::new("rmout/t", format!("{i}").as_bytes(), 1).pid(i + 1)).await;
    }
    let m0 = s.expect_pub().await;
    let m1 = s.expect_pub().await;
    s.expect_nothing(Duration::from_millis(500)).await;
    s.send(&puback(m0.pid.expect("pid"))).await;
    let m2 = s.expect_pub().await;
    s.expect_nothing(Duration::from_millis(300)).await;
    s.send(&puback(m1.pid.expect("pid"))).await;
    s.send(&puback(m2.pid.expect("pid"))).await;
    let m3 = recv_and_ack(&mut s).await;
    let m4 = recv_and_ack(&mut s).await;
    let got: Vec<Vec<u8>> = [m0, m1, m2, m3, m4].into_iter().map(|m| m.payload).collect();
    assert_eq!(got, vec![b"0".to_vec(), b"1".to_vec(), b"2".to_vec(), b"3".to_vec(), b"4".to_vec()]);
}

#[tokio::test]
async fn max_inflight_outbound_respected_v311() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("max_inflight = 2")).await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v3("inflight3")).await;
    s.sub("inflight/t", 1).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v3("inflight3-pub")).await;
    for i in 0..4u16 {
        p.publish_acked(&Pub::new("inflight/t", format!("{i}").as_bytes(), 1).pid(i + 1)).await;
    }
    let m0 = s.expect_pub().await;
    let _m1 = s.expect_pub().await;
    s.expect_nothing(Duration::from_millis(500)).await;
    s.send(&puback(m0.pid.expect("pid"))).await;
    let m2 = s.expect_pub().await;
    assert_eq!(m2.payload, b"2");
}

// ------------------------------------------------------------ topic aliases

#[tokio::test]
async fn topic_alias_inbound() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("topic_alias_maximum = 10")).await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("alias-sub")).await;
    s.sub("alias/t", 0).await;
    let (mut p, ack) = RawClient::connect(b.addr, &Conn::v5("alias-pub")).await;
    assert_eq!(connack_props(&ack).u16_of(TOPIC_ALIAS_MAXIMUM), Some(10));
    p.publish(&Pub::new("alias/t", b"1", 0).prop(Prop::U16(TOPIC_ALIAS, 3))).await;
    p.publish(&Pub::new("", b"2", 0).prop(Prop::U16(TOPIC_ALIAS, 3))).await;
    p.publish_acked(&Pub::new("", b"3", 1).pid(8).prop(Prop::U16(TOPIC_ALIAS, 3))).await;
    for want in [b"1", b"2", b"3"] {
        let m = s.expect_pub().await;
        assert_eq!(m.topic, "alias/t");
        assert_eq!(m.payload, want);
        assert!(m.props.find(TOPIC_ALIAS).is_none() || !m.topic.is_empty());
    }
    // Re-map alias 3 to another topic.
    s.sub("alias/u", 0).await;
    p.publish(&Pub::new("alias/u", b"4", 0).prop(Prop::U16(TOPIC_ALIAS, 3))).await;
    p.publish(&Pub::new("", b"5", 0).prop(Prop::U16(TOPIC_ALIAS, 3))).await;
    for want in [b"4", b"5"] {
        let m = s.expect_pub().await;
        assert_eq!((m.topic.as_str(), m.payload.as_slice()), ("alias/u", &want[..]));
    }
}

async fn alias_error(alias: Option<u16>, topic: &str, want: &[u8]) {
    let b = Broker::start_with(BrokerCfg::new().mqtt("topic_alias_maximum = 10")).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("alias-bad")).await;
    let mut m = Pub::new(topic, b"x", 0);
    if let Some(a) = alias {
        m = m.prop(Prop::U16(TOPIC_ALIAS, a));
    }
    p.publish(&m).await;
    let got = p.expect_closed(common::DEADLINE).await;
    assert!(
        matches!(got.as_slice(), [Pkt::Disconnect { code, .. }] if want.contains(code)),
        "alias {alias:?} topic {topic:?}: expected DISCONNECT with one of {want:02x?}, got {got:?}"
    );
}

#[tokio::test]
async fn topic_alias_zero_is_invalid() {
    // MQTT-3.3.2-8 forbids alias 0: Topic Alias invalid, or a protocol error.
    alias_error(Some(0), "alias/t", &[0x94, 0x82]).await;
}

#[tokio::test]
async fn topic_alias_above_maximum_is_invalid() {
    alias_error(Some(11), "alias/t", &[0x94]).await;
}

#[tokio::test]
async fn topic_alias_unknown_with_empty_topic_is_protocol_error() {
    alias_error(Some(4), "", &[0x82]).await;
}

#[tokio::test]
async fn empty_topic_without_alias_is_protocol_error() {
    alias_error(None, "", &[0x82]).await;
}

// ------------------------------------------------------------ properties

#[tokio::test]
async fn properties_passed_through_unchanged() {
    let b = Broker::start().await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("props-sub")).await;
    s.sub("props/t", 1).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("props-pub")).await;
    let users = vec![Prop::user("b", "2"), Prop::user("a", "1"), Prop::user("b", "3"), Prop::user("ü", "✓")];
    let mut m = Pub::new("props/t", "héllo".as_bytes(), 1)
        .pid(4)
        .prop(Prop::Byte(PAYLOAD_FORMAT, 1))
        .prop(Prop::Str(CONTENT_TYPE, "text/plain; charset=utf-8".into()))
        .prop(Prop::Str(RESPONSE_TOPIC, "props/reply".into()))
        .prop(Prop::Bin(CORRELATION_DATA, vec![0, 255, 7]));
    for u in users {
        m = m.prop(u);
    }
    p.publish_acked(&m).await;
    let got = recv_and_ack(&mut s).await;
    assert_eq!(got.payload, "héllo".as_bytes());
    assert_eq!(got.props.u8_of(PAYLOAD_FORMAT), Some(1));
    assert_eq!(got.props.str_of(CONTENT_TYPE), Some("text/plain; charset=utf-8"));
    assert_eq!(got.props.str_of(RESPONSE_TOPIC), Some("props/reply"));
    assert_eq!(got.props.bin_of(CORRELATION_DATA), Some(&[0u8, 255, 7][..]));
    assert_eq!(
        got.props.users(),
        vec![
            ("b".to_string(), "2".to_string()),
            ("a".into(), "1".into()),
            ("b".into(), "3".into()),
            ("ü".into(), "✓".into())
        ],
        "user properties in order"
    );
    assert!(got.props.find(TOPIC_ALIAS).is_none());
}

#[tokio::test]
async fn rumqttc_v5_properties_pass_through() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::start().await;
    let mut s = common::V5::connect(b.addr, "rq5p-sub").await;
    s.client.subscribe("rq5p/t", QoS::AtLeastOnce).await.expect("sub");
    s.suback().await;
    let p = common::V5::connect(b.addr, "rq5p-pub").await;
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("rq5p/reply".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"cid")),
        user_properties: vec![("x".into(), "y".into())],
        ..Default::default()
    };
    p.client.publish_with_properties("rq5p/t", QoS::AtLeastOnce, false, "{}", props).await.expect("publish");
    let m = s.publish().await;
    let got = m.properties.expect("properties");
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.response_topic.as_deref(), Some("rq5p/reply"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"cid"[..]));
    assert_eq!(got.user_properties, vec![("x".to_string(), "y".to_string())]);
}

// ------------------------------------------------------------ message expiry

#[tokio::test]
async fn message_expiry_remaining_interval_live() {
    let b = Broker::start().await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("mexp-live")).await;
    s.sub("mexp/live", 1).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("mexp-live-pub")).await;
    p.publish_acked(&Pub::new("mexp/live", b"x", 1).pid(1).prop(Prop::U32(MESSAGE_EXPIRY, 100))).await;
    let m = recv_and_ack(&mut s).await;
    let left = m.props.u32_of(MESSAGE_EXPIRY).expect("Message Expiry Interval forwarded");
    assert!((98..=100).contains(&left), "remaining {left}");
}

#[tokio::test]
async fn message_expiry_offline_queue() {
    let b = Broker::start().await;
    let conn = Conn::v5("mexp-sub").clean(false).expiry(60);
    let (mut s, _) = RawClient::connect_ok(b.addr, &conn).await;
    s.sub("mexp/t", 1).await;
    s.disconnect().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("mexp-pub")).await;
    p.publish_acked(&Pub::new("mexp/t", b"short", 1).pid(1).prop(Prop::U32(MESSAGE_EXPIRY, 1))).await;
    p.publish_acked(&Pub::new("mexp/t", b"long", 1).pid(2).prop(Prop::U32(MESSAGE_EXPIRY, 10))).await;
    p.publish_acked(&Pub::new("mexp/t", b"forever", 1).pid(3)).await;
    // Let the 1 s message expire (and 1+ s pass for the 10 s one).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (mut s, sp) = RawClient::connect_ok(b.addr, &conn).await;
    assert!(sp);
    let m = recv_and_ack(&mut s).await;
    assert_eq!(m.payload, b"long", "the expired message must not be delivered");
    let left = m.props.u32_of(MESSAGE_EXPIRY).expect("remaining expiry");
    assert!(left <= 8, "remaining interval must be lowered by the time spent queued: {left}");
    let m2 = recv_and_ack(&mut s).await;
    assert_eq!(m2.payload, b"forever");
    assert!(m2.props.find(MESSAGE_EXPIRY).is_none());
}

#[tokio::test]
async fn retain_not_available() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("retain_available = false")).await;
    let (mut c, ack) = RawClient::connect(b.addr, &Conn::v5("noretain")).await;
    assert_eq!(connack_props(&ack).u8_of(RETAIN_AVAILABLE), Some(0), "CONNACK Retain Available = 0");
    c.publish(&Pub::new("nr/t", b"x", 0).retain(true)).await;
    let got = c.expect_closed(common::DEADLINE).await;
    assert!(
        matches!(got.as_slice(), [Pkt::Disconnect { code: 0x9A, .. }]),
        "expected DISCONNECT 0x9A (retain not supported), got {got:?}"
    );
}

#[tokio::test]
async fn request_problem_information_zero_suppresses_reason_strings() {
    // MQTT-3.1.2-29: no Reason String / User Properties except on PUBLISH, CONNACK, DISCONNECT.
    let b = Broker::start().await;
    let (mut c, _) =
        RawClient::connect_ok(b.addr, &Conn::v5("rpi0").prop(Prop::Byte(REQUEST_PROBLEM_INFO, 0))).await;
    c.send(&pubrel(999)).await;
    match c.expect(WAIT).await {
        Pkt::PubComp { pid: 999, props, .. } => {
            assert!(props.find(REASON_STRING).is_none(), "PUBCOMP carries a Reason String: {props:?}")
        }
        other => panic!("{other:?}"),
    }
    c.send(&unsubscribe(true, 3, &["never/subscribed"])).await;
    match c.expect(WAIT).await {
        Pkt::UnsubAck { pid: 3, props, .. } => {
            assert!(props.find(REASON_STRING).is_none(), "UNSUBACK carries a Reason String: {props:?}")
        }
        other => panic!("{other:?}"),
    }
}
