//! Handshake tests driving `serve_connection` over in-memory duplex streams
//! with the crate's own codec (no sockets, no ports).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::auth::StaticAuthenticator;
use crate::protocol::{
    decode, encode, reason, ConnAck, Connect, ConnectProperties, Disconnect, LastWill, Packet,
    ProtocolVersion, ProtocolVersionOrDefault, PubResp, Publish, PublishProperties, QoS, RetainHandling,
    Subscribe, SubscriptionOptions, Unsubscribe, WillProperties,
};

use super::{Broker, BrokerConfig};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;
const WAIT: Duration = Duration::from_secs(5);

fn broker_with(cfg: BrokerConfig) -> Broker {
    Broker::new(cfg, Arc::new(StaticAuthenticator::new(true, None)))
}

fn broker() -> Broker {
    broker_with(BrokerConfig { sys_interval: 0, ..Default::default() })
}

struct Client {
    s: DuplexStream,
    buf: BytesMut,
    v: ProtocolVersion,
}

impl Client {
    fn open(b: &Broker, v: ProtocolVersion) -> Client {
        let (a, srv) = tokio::io::duplex(256 * 1024);
        let b = b.clone();
        tokio::spawn(async move {
            b.serve_connection(srv, "127.0.0.1:1".parse().expect("addr")).await;
        });
        Client { s: a, buf: BytesMut::new(), v }
    }

    async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        encode(&p, self.v, &mut b).expect("encode");
        self.s.write_all(&b).await.expect("write");
    }

    /// Next packet, or None when the server closed the stream.
    async fn recv(&mut self) -> Option<Packet> {
        let fut = async {
            loop {
                if let Some(p) =
                    decode(&mut self.buf, Some(self.v), 1 << 24).expect("server sent a bad packet")
                {
                    return Some(p);
                }
                match self.s.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(WAIT, fut).await.expect("timed out waiting for a packet")
    }

    /// Asserts nothing arrives within `ms` (a negative check, bounded).
    async fn nothing_for(&mut self, ms: u64) {
        let fut = async {
            loop {
                if let Some(p) = decode(&mut self.buf, Some(self.v), 1 << 24).expect("bad packet") {
                    return Some(p);
                }
                match self.s.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(ms), fut).await {
            panic!("unexpected packet {p:?}");
        }
    }

    async fn publish(&mut self) -> Publish {
        match self.recv().await {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    async fn expect_disconnect(&mut self, code: u8) {
        match self.recv().await {
            Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, code, "{d:?}"),
            other => panic!("expected DISCONNECT {code:#x}, got {other:?}"),
        }
        assert_eq!(self.recv().await, None, "connection must close after DISCONNECT");
    }

    async fn subscribe(&mut self, pid: u16, filter: &str, qos: QoS) {
        self.subscribe_opts(pid, filter, SubscriptionOptions { qos, ..Default::default() }, None).await;
    }

    async fn subscribe_opts(&mut self, pid: u16, filter: &str, opts: SubscriptionOptions, id: Option<u32>) {
        self.send(Packet::Subscribe(Subscribe {
            packet_id: pid,
            filters: vec![(filter.into(), opts)],
            subscription_identifier: id,
            ..Default::default()
        }))
        .await;
        match self.recv().await {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.packet_id, pid);
                assert_eq!(a.reason_codes, vec![opts.qos as u8]);
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn pub_msg(&mut self, topic: &str, payload: &'static [u8], qos: QoS, pid: u16, retain: bool) {
        self.send(Packet::Publish(Publish {
            qos,
            retain,
            topic: topic.into(),
            packet_id: (qos != QoS::AtMostOnce).then_some(pid),
            payload: Bytes::from_static(payload),
            ..Default::default()
        }))
        .await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => assert_eq!(self.recv().await, Some(Packet::PubAck(PubResp::new(pid)))),
            QoS::ExactlyOnce => {
                assert_eq!(self.recv().await, Some(Packet::PubRec(PubResp::new(pid))));
                self.send(Packet::PubRel(PubResp::new(pid))).await;
                assert_eq!(self.recv().await, Some(Packet::PubComp(PubResp::new(pid))));
            }
        }
    }
}

fn connect_packet(v: ProtocolVersion, id: &str) -> Connect {
    Connect {
        protocol: ProtocolVersionOrDefault(v),
        clean_start: true,
        keep_alive: 60,
        client_id: id.into(),
        ..Default::default()
    }
}

async fn connect_with(b: &Broker, v: ProtocolVersion, c: Connect) -> (Client, ConnAck) {
    let mut cl = Client::open(b, v);
    cl.send(Packet::Connect(c)).await;
    match cl.recv().await {
        Some(Packet::ConnAck(a)) => (cl, a),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn connect(b: &Broker, v: ProtocolVersion, id: &str) -> Client {
    let (c, ack) = connect_with(b, v, connect_packet(v, id)).await;
    assert_eq!(ack.reason_code, 0);
    c
}

/// A v5 client with a persistent session.
async fn connect_persistent(b: &Broker, id: &str, clean: bool) -> (Client, ConnAck) {
    let mut c = connect_packet(V5, id);
    c.clean_start = clean;
    c.properties.session_expiry_interval = Some(300);
    connect_with(b, V5, c).await
}

#[tokio::test]
async fn connack_v5_properties_and_assigned_id() {
    let b = broker();
    let mut c = connect_packet(V5, "");
    c.keep_alive = 100;
    c.properties.request_response_information = Some(true);
    let b2 = broker_with(BrokerConfig { max_keep_alive: 30, sys_interval: 0, ..Default::default() });
    let (_cl, ack) = connect_with(&b2, V5, c).await;
    assert_eq!(ack.reason_code, 0);
    let p = &ack.properties;
    let id = p.assigned_client_identifier.clone().expect("assigned id");
    assert!(!id.is_empty());
    assert_eq!(p.server_keep_alive, Some(30));
    assert_eq!(p.receive_maximum, Some(100));
    assert_eq!(p.maximum_packet_size, Some(1_048_576));
    assert_eq!(p.topic_alias_maximum, Some(10));
    assert_eq!(p.retain_available, Some(true));
    assert_eq!(p.shared_subscription_available, Some(true));
    assert_eq!(p.response_information, Some(format!("raftmq/response/{id}/")));
    // 3.1.1: empty id needs clean session.
    let mut c = connect_packet(V3, "");
    c.clean_start = false;
    let mut cl = Client::open(&b, V3);
    cl.send(Packet::Connect(c)).await;
    match cl.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(reason::connack_v311_code(a.reason_code), 2),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert_eq!(cl.recv().await, None);
}

#[tokio::test]
async fn auth_method_and_second_connect_are_refused() {
    let b = broker();
    let mut c = connect_packet(V5, "a");
    c.properties = ConnectProperties { authentication_method: Some("SCRAM".into()), ..Default::default() };
    let (mut cl, ack) = connect_with(&b, V5, c).await;
    assert_eq!(ack.reason_code, reason::BAD_AUTHENTICATION_METHOD);
    assert_eq!(cl.recv().await, None);
    let mut cl = connect(&b, V5, "b").await;
    cl.send(Packet::Connect(connect_packet(V5, "b"))).await;
    cl.expect_disconnect(reason::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn qos0_qos1_pubsub_both_versions() {
    let b = broker();
    for v in [V3, V5] {
        let mut sub = connect(&b, v, "sub").await;
        sub.subscribe(1, "a/+", QoS::AtLeastOnce).await;
        let mut publ = connect(&b, v, "pub").await;
        publ.pub_msg("a/b", b"zero", QoS::AtMostOnce, 0, false).await;
        let p = sub.publish().await;
        assert_eq!((p.topic.as_str(), &p.payload[..], p.qos), ("a/b", &b"zero"[..], QoS::AtMostOnce));
        publ.pub_msg("a/c", b"one", QoS::AtLeastOnce, 7, false).await;
        let p = sub.publish().await;
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert!(!p.retain && !p.dup);
        let pid = p.packet_id.expect("packet id");
        sub.send(Packet::PubAck(PubResp::new(pid))).await;
        publ.send(Packet::Disconnect(Disconnect::default())).await;
        sub.send(Packet::Disconnect(Disconnect::default())).await;
        assert_eq!(sub.recv().await, None);
    }
}

#[tokio::test]
async fn qos2_inbound_handshake_and_duplicates() {
    let b = broker();
    let mut sub = connect(&b, V5, "sub").await;
    sub.subscribe(1, "t", QoS::AtMostOnce).await;
    let mut p = connect(&b, V5, "pub").await;
    let publish = Publish {
        qos: QoS::ExactlyOnce,
        topic: "t".into(),
        packet_id: Some(3),
        payload: Bytes::from_static(b"x"),
        ..Default::default()
    };
    p.send(Packet::Publish(publish.clone())).await;
    assert_eq!(p.recv().await, Some(Packet::PubRec(PubResp::new(3))));
    // The duplicate is acknowledged but not routed again.
    p.send(Packet::Publish(Publish { dup: true, ..publish })).await;
    assert_eq!(p.recv().await, Some(Packet::PubRec(PubResp::new(3))));
    assert_eq!(sub.publish().await.payload, Bytes::from_static(b"x"));
    p.send(Packet::PubRel(PubResp::new(3))).await;
    assert_eq!(p.recv().await, Some(Packet::PubComp(PubResp::new(3))));
    p.send(Packet::PubRel(PubResp::new(9))).await;
    assert_eq!(
        p.recv().await,
        Some(Packet::PubComp(PubResp::with_reason(9, reason::PACKET_IDENTIFIER_NOT_FOUND)))
    );
    sub.nothing_for(100).await;
}

#[tokio::test]
async fn qos2_outbound_handshake() {
    let b = broker();
    let mut sub = connect(&b, V3, "sub").await;
    sub.subscribe(1, "t", QoS::ExactlyOnce).await;
    let mut p = connect(&b, V3, "pub").await;
    p.pub_msg("t", b"x", QoS::ExactlyOnce, 1, false).await;
    let m = sub.publish().await;
    assert_eq!(m.qos, QoS::ExactlyOnce);
    let pid = m.packet_id.expect("id");
    sub.send(Packet::PubRec(PubResp::new(pid))).await;
    assert_eq!(sub.recv().await, Some(Packet::PubRel(PubResp::new(pid))));
    sub.send(Packet::PubComp(PubResp::new(pid))).await;
    sub.nothing_for(100).await;
}

#[tokio::test]
async fn receive_maximum_exceeded_disconnects() {
    let b = broker_with(BrokerConfig { receive_maximum: 2, sys_interval: 0, ..Default::default() });
    let mut p = connect(&b, V5, "pub").await;
    for pid in 1..=3u16 {
        p.send(Packet::Publish(Publish {
            qos: QoS::ExactlyOnce,
            topic: "t".into(),
            packet_id: Some(pid),
            ..Default::default()
        }))
        .await;
    }
    assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
    assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
    p.expect_disconnect(reason::RECEIVE_MAXIMUM_EXCEEDED).await;
}

#[tokio::test]
async fn client_receive_maximum_limits_inflight() {
    let b = broker();
    let mut c = connect_packet(V5, "sub");
    c.properties.receive_maximum = Some(1);
    let (mut sub, _) = connect_with(&b, V5, c).await;
    sub.subscribe(1, "t", QoS::AtLeastOnce).await;
    let mut p = connect(&b, V5, "pub").await;
    p.pub_msg("t", b"1", QoS::AtLeastOnce, 1, false).await;
    p.pub_msg("t", b"2", QoS::AtLeastOnce, 2, false).await;
    let m1 = sub.publish().await;
    assert_eq!(m1.payload, Bytes::from_static(b"1"));
    sub.nothing_for(150).await;
    sub.send(Packet::PubAck(PubResp::new(m1.packet_id.expect("id")))).await;
    let m2 = sub.publish().await;
    assert_eq!(m2.payload, Bytes::from_static(b"2"));
}

#[tokio::test]
async fn topic_aliases() {
    let b = broker();
    let mut sub = connect(&b, V5, "sub").await;
    sub.subscribe(1, "long/topic", QoS::AtMostOnce).await;
    let mut p = connect(&b, V5, "pub").await;
    let with_alias = |topic: &str, alias: u16| {
        Packet::Publish(Publish {
            topic: topic.into(),
            properties: PublishProperties { topic_alias: Some(alias), ..Default::default() },
            payload: Bytes::from_static(b"a"),
            ..Default::default()
        })
    };
    p.send(with_alias("long/topic", 3)).await;
    p.send(with_alias("", 3)).await;
    assert_eq!(sub.publish().await.topic, "long/topic");
    let second = sub.publish().await;
    assert_eq!(second.topic, "long/topic");
    assert_eq!(second.properties.topic_alias, None);
    p.send(with_alias("", 4)).await;
    p.expect_disconnect(reason::PROTOCOL_ERROR).await;
    let mut p = connect(&b, V5, "pub2").await;
    p.send(with_alias("x", 11)).await;
    p.expect_disconnect(reason::TOPIC_ALIAS_INVALID).await;
}

#[tokio::test]
async fn takeover_disconnects_old_and_sends_its_will() {
    let b = broker();
    let mut w = connect(&b, V5, "watch").await;
    w.subscribe(1, "will/#", QoS::AtMostOnce).await;
    let mut c = connect_packet(V5, "dev");
    c.will = Some(LastWill {
        topic: "will/dev".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties { content_type: Some("text/plain".into()), ..Default::default() },
    });
    let (mut old, _) = connect_with(&b, V5, c).await;
    let _new = connect(&b, V5, "dev").await;
    old.expect_disconnect(reason::SESSION_TAKEN_OVER).await;
    let m = w.publish().await;
    assert_eq!(m.topic, "will/dev");
    assert_eq!(m.properties.content_type.as_deref(), Some("text/plain"));
}

#[tokio::test]
async fn will_on_abnormal_close_and_0x04_but_not_on_normal_disconnect() {
    let b = broker();
    let mut w = connect(&b, V5, "watch").await;
    w.subscribe(1, "will", QoS::AtMostOnce).await;
    let will = LastWill {
        topic: "will".into(),
        payload: Bytes::from_static(b"w"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties::default(),
    };
    let mut c = connect_packet(V5, "a");
    c.will = Some(will.clone());
    let (mut a, _) = connect_with(&b, V5, c.clone()).await;
    a.send(Packet::Disconnect(Disconnect::default())).await;
    assert_eq!(a.recv().await, None);
    w.nothing_for(150).await;
    let (mut a, _) = connect_with(&b, V5, c.clone()).await;
    a.send(Packet::Disconnect(Disconnect {
        reason_code: reason::DISCONNECT_WITH_WILL_MESSAGE,
        ..Default::default()
    }))
    .await;
    assert_eq!(w.publish().await.topic, "will");
    let (a, _) = connect_with(&b, V5, c).await;
    drop(a);
    assert_eq!(w.publish().await.topic, "will");
}

#[tokio::test]
async fn persistent_session_resends_with_dup_and_queues_offline() {
    let b = broker();
    let (mut s, ack) = connect_persistent(&b, "sub", true).await;
    assert!(!ack.session_present);
    s.subscribe(1, "t/#", QoS::AtLeastOnce).await;
    let mut p = connect(&b, V5, "pub").await;
    p.pub_msg("t/1", b"first", QoS::AtLeastOnce, 1, false).await;
    let m = s.publish().await;
    assert!(!m.dup);
    let pid = m.packet_id.expect("id");
    drop(s); // no PUBACK
    p.pub_msg("t/2", b"second", QoS::AtLeastOnce, 2, false).await;
    let (mut s, ack) = connect_persistent(&b, "sub", false).await;
    assert!(ack.session_present);
    let again = s.publish().await;
    assert!(again.dup);
    assert_eq!(again.packet_id, Some(pid));
    assert_eq!(again.payload, Bytes::from_static(b"first"));
    s.send(Packet::PubAck(PubResp::new(pid))).await;
    let queued = s.publish().await;
    assert_eq!(queued.payload, Bytes::from_static(b"second"));
    s.send(Packet::PubAck(PubResp::new(queued.packet_id.expect("id")))).await;
    s.send(Packet::Disconnect(Disconnect::default())).await;
    assert_eq!(s.recv().await, None);
    // Clean start drops the session.
    let (_s, ack) = connect_persistent(&b, "sub", true).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn persistent_qos2_outbound_resumes_with_pubrel() {
    let b = broker();
    let (mut s, _) = connect_persistent(&b, "sub", true).await;
    s.subscribe(1, "t", QoS::ExactlyOnce).await;
    let mut p = connect(&b, V5, "pub").await;
    p.pub_msg("t", b"x", QoS::ExactlyOnce, 1, false).await;
    let m = s.publish().await;
    let pid = m.packet_id.expect("id");
    s.send(Packet::PubRec(PubResp::new(pid))).await;
    assert_eq!(s.recv().await, Some(Packet::PubRel(PubResp::new(pid))));
    drop(s);
    let (mut s, ack) = connect_persistent(&b, "sub", false).await;
    assert!(ack.session_present);
    assert_eq!(s.recv().await, Some(Packet::PubRel(PubResp::new(pid))));
    s.send(Packet::PubComp(PubResp::new(pid))).await;
    s.nothing_for(150).await;
}

#[tokio::test]
async fn retained_messages_and_retain_handling() {
    let b = broker();
    let mut p = connect(&b, V3, "pub").await;
    p.pub_msg("r/1", b"kept", QoS::AtLeastOnce, 1, true).await;
    let mut s = connect(&b, V5, "sub").await;
    s.subscribe(1, "r/#", QoS::AtLeastOnce).await;
    let m = s.publish().await;
    assert!(m.retain);
    assert_eq!(m.payload, Bytes::from_static(b"kept"));
    s.send(Packet::PubAck(PubResp::new(m.packet_id.expect("id")))).await;
    // Retain Handling 1: the subscription exists, nothing is sent.
    let opts = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        retain_handling: RetainHandling::SendIfNew,
        ..Default::default()
    };
    s.subscribe_opts(2, "r/#", opts, None).await;
    s.nothing_for(100).await;
    let opts = SubscriptionOptions { retain_handling: RetainHandling::DoNotSend, ..Default::default() };
    s.subscribe_opts(3, "r/+", opts, None).await;
    s.nothing_for(100).await;
    // Clear with an empty payload.
    p.pub_msg("r/1", b"", QoS::AtLeastOnce, 2, true).await;
    let live = s.publish().await;
    assert!(!live.retain, "live delivery without Retain As Published");
    let mut s2 = connect(&b, V3, "sub2").await;
    s2.subscribe(1, "r/#", QoS::AtMostOnce).await;
    s2.nothing_for(100).await;
}

#[tokio::test]
async fn no_local_subscription_ids_and_unsubscribe() {
    let b = broker();
    let mut c = connect(&b, V5, "c").await;
    let opts = SubscriptionOptions { no_local: true, ..Default::default() };
    c.subscribe_opts(1, "x/#", opts, Some(5)).await;
    c.subscribe_opts(2, "x/+", SubscriptionOptions::default(), Some(6)).await;
    let mut o = connect(&b, V5, "o").await;
    o.pub_msg("x/y", b"1", QoS::AtMostOnce, 0, false).await;
    let m = c.publish().await;
    let mut ids = m.properties.subscription_identifiers.clone();
    ids.sort_unstable();
    assert_eq!(ids, vec![5, 6]);
    // Own message: only the x/+ subscription (not no_local) matches.
    c.pub_msg("x/z", b"2", QoS::AtMostOnce, 0, false).await;
    let m = c.publish().await;
    assert_eq!(m.properties.subscription_identifiers, vec![6]);
    c.send(Packet::Unsubscribe(Unsubscribe {
        packet_id: 9,
        filters: vec!["x/+".into(), "nope".into()],
        ..Default::default()
    }))
    .await;
    match c.recv().await {
        Some(Packet::UnsubAck(u)) => assert_eq!(u.reason_codes, vec![0, reason::NO_SUBSCRIPTION_EXISTED]),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    // Shared subscription with no local is a protocol error.
    c.send(Packet::Subscribe(Subscribe {
        packet_id: 10,
        filters: vec![("$share/g/x".into(), SubscriptionOptions { no_local: true, ..Default::default() })],
        ..Default::default()
    }))
    .await;
    c.expect_disconnect(reason::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn shared_subscription_spreads_messages() {
    let b = broker();
    let mut a = connect(&b, V5, "a").await;
    let mut c = connect(&b, V5, "c").await;
    a.subscribe(1, "$share/g/s/#", QoS::AtMostOnce).await;
    c.subscribe(1, "$share/g/s/#", QoS::AtMostOnce).await;
    let mut p = connect(&b, V5, "p").await;
    for _ in 0..4 {
        p.pub_msg("s/1", b"m", QoS::AtMostOnce, 0, false).await;
    }
    for _ in 0..2 {
        a.publish().await;
        c.publish().await;
    }
    a.nothing_for(100).await;
}

#[tokio::test]
async fn keep_alive_timeout_closes_with_0x8d_and_will() {
    let b = broker();
    let mut w = connect(&b, V3, "w").await;
    w.subscribe(1, "ka", QoS::AtMostOnce).await;
    let mut c = connect_packet(V5, "k");
    c.keep_alive = 1;
    c.will = Some(LastWill {
        topic: "ka".into(),
        payload: Bytes::from_static(b"dead"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties::default(),
    });
    let (mut k, _) = connect_with(&b, V5, c).await;
    k.send(Packet::PingReq).await;
    assert_eq!(k.recv().await, Some(Packet::PingResp));
    k.expect_disconnect(reason::KEEP_ALIVE_TIMEOUT).await;
    assert_eq!(w.publish().await.payload, Bytes::from_static(b"dead"));
}

#[tokio::test]
async fn packet_too_large_and_topic_invalid() {
    let b = broker_with(BrokerConfig { max_packet_size: 64, sys_interval: 0, ..Default::default() });
    let mut c = connect(&b, V5, "c").await;
    c.send(Packet::Publish(Publish {
        topic: "t".into(),
        payload: Bytes::from(vec![0u8; 100]),
        ..Default::default()
    }))
    .await;
    c.expect_disconnect(reason::PACKET_TOO_LARGE).await;
    let b = broker();
    let mut c = connect(&b, V5, "c").await;
    c.send(Packet::Publish(Publish { topic: "a/+".into(), ..Default::default() })).await;
    c.expect_disconnect(reason::TOPIC_NAME_INVALID).await;
    let mut c = connect(&b, V5, "c").await;
    let props = PublishProperties { subscription_identifiers: vec![3], ..Default::default() };
    c.send(Packet::Publish(Publish { topic: "a".into(), properties: props, ..Default::default() })).await;
    c.expect_disconnect(reason::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn client_maximum_packet_size_drops_big_messages() {
    let b = broker();
    let mut cp = connect_packet(V5, "small");
    cp.properties.maximum_packet_size = Some(40);
    let (mut s, _) = connect_with(&b, V5, cp).await;
    s.subscribe(1, "t", QoS::AtMostOnce).await;
    let mut p = connect(&b, V5, "p").await;
    p.send(Packet::Publish(Publish {
        topic: "t".into(),
        payload: Bytes::from(vec![1u8; 100]),
        ..Default::default()
    }))
    .await;
    p.pub_msg("t", b"ok", QoS::AtMostOnce, 0, false).await;
    assert_eq!(s.publish().await.payload, Bytes::from_static(b"ok"));
}

#[tokio::test]
async fn sys_topics_are_published_and_not_matched_by_hash() {
    let b = broker_with(BrokerConfig { sys_interval: 1, ..Default::default() });
    let mut all = connect(&b, V3, "all").await;
    all.subscribe(1, "#", QoS::AtMostOnce).await;
    let mut sys = connect(&b, V3, "sys").await;
    sys.subscribe(1, "$SYS/broker/uptime", QoS::AtMostOnce).await;
    let m = sys.publish().await;
    assert!(m.retain);
    assert!(std::str::from_utf8(&m.payload).expect("utf8").ends_with(" seconds"));
    all.nothing_for(200).await;
}

#[tokio::test]
async fn slow_consumer_does_not_block_others() {
    let b = broker_with(BrokerConfig { outbox_capacity: 10, sys_interval: 0, ..Default::default() });
    // The slow client's stream buffer is tiny and it never reads.
    let (slow_side, srv) = tokio::io::duplex(64);
    {
        let b = b.clone();
        tokio::spawn(async move { b.serve_connection(srv, "127.0.0.1:2".parse().expect("addr")).await });
    }
    let mut slow = Client { s: slow_side, buf: BytesMut::new(), v: V3 };
    slow.send(Packet::Connect(connect_packet(V3, "slow"))).await;
    assert!(matches!(slow.recv().await, Some(Packet::ConnAck(_))));
    slow.subscribe(1, "f", QoS::AtMostOnce).await;
    let mut fast = connect(&b, V3, "fast").await;
    fast.subscribe(1, "f", QoS::AtMostOnce).await;
    let mut p = connect(&b, V3, "p").await;
    // Lock-step with the fast subscriber: it must get every message while the
    // slow one's outbox overflows.
    for _ in 0..2000 {
        p.send(Packet::Publish(Publish {
            topic: "f".into(),
            payload: Bytes::from_static(&[7u8; 200]),
            ..Default::default()
        }))
        .await;
        fast.publish().await;
    }
    assert!(super::Metrics::get(&b.metrics().messages_dropped_outbox) > 0);
}

#[tokio::test]
async fn broker_over_restored_state_routes_to_stored_sessions() {
    let b = broker();
    let (mut s, _) = connect_persistent(&b, "sub", true).await;
    s.subscribe(1, "t", QoS::AtLeastOnce).await;
    s.send(Packet::Disconnect(Disconnect::default())).await;
    assert_eq!(s.recv().await, None);
    b.shutdown().await;
    let snapshot = b.state().read().snapshot();
    let restored = crate::state::State::from_snapshot(snapshot, BrokerConfig::default().state_limits())
        .expect("restore");
    let b2 = Broker::with_state(
        BrokerConfig { sys_interval: 0, ..Default::default() },
        Arc::new(StaticAuthenticator::new(true, None)),
        Arc::new(parking_lot::RwLock::new(restored)),
    );
    let mut p = connect(&b2, V5, "pub").await;
    p.pub_msg("t", b"kept", QoS::AtLeastOnce, 1, false).await;
    let (mut s, ack) = connect_persistent(&b2, "sub", false).await;
    assert!(ack.session_present);
    assert_eq!(s.publish().await.payload, Bytes::from_static(b"kept"));
}

#[tokio::test]
async fn will_delay_is_cancelled_by_resume_and_fires_after_the_delay() {
    let b = broker();
    let mut w = connect(&b, V5, "watch").await;
    w.subscribe(1, "will/d", QoS::AtMostOnce).await;
    let mut c = connect_packet(V5, "dev");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(60);
    c.will = Some(LastWill {
        topic: "will/d".into(),
        payload: Bytes::from_static(b"late"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties { will_delay_interval: Some(1), ..Default::default() },
    });
    let (dev, _) = connect_with(&b, V5, c.clone()).await;
    drop(dev);
    // Resumed within the delay: no will.
    let (dev, ack) = connect_with(&b, V5, c.clone()).await;
    assert!(ack.session_present);
    w.nothing_for(1500).await;
    drop(dev);
    let started = std::time::Instant::now();
    let m = w.publish().await;
    assert_eq!(m.payload, Bytes::from_static(b"late"));
    assert!(started.elapsed() >= Duration::from_millis(800), "will sent before its delay");
}

#[tokio::test]
async fn persistent_session_gets_retained_through_state() {
    let b = broker();
    let mut p = connect(&b, V5, "pub").await;
    p.pub_msg("r/a", b"q1", QoS::AtLeastOnce, 1, true).await;
    p.pub_msg("r/b", b"q0", QoS::AtMostOnce, 0, true).await;
    let (mut s, _) = connect_persistent(&b, "ps", true).await;
    s.send(Packet::Subscribe(Subscribe {
        packet_id: 4,
        filters: vec![("r/#".into(), SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() })],
        ..Default::default()
    }))
    .await;
    let mut got = Vec::new();
    let mut suback = false;
    while got.len() < 2 || !suback {
        match s.recv().await {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.reason_codes, vec![1]);
                suback = true;
            }
            Some(Packet::Publish(m)) => {
                assert!(m.retain);
                got.push((m.topic.clone(), m.qos));
                if let Some(id) = m.packet_id {
                    s.send(Packet::PubAck(PubResp::new(id))).await;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    got.sort();
    assert_eq!(got, vec![("r/a".to_string(), QoS::AtLeastOnce), ("r/b".to_string(), QoS::AtMostOnce)]);
}

struct Picky;

impl crate::auth::Authenticator for Picky {
    fn authenticate(&self, req: &crate::auth::AuthRequest<'_>) -> crate::auth::AuthDecision {
        match req.username {
            Some("bad") => crate::auth::AuthDecision::BadCredentials,
            _ => crate::auth::AuthDecision::Allow,
        }
    }
    fn can_publish(&self, _: &str, _: Option<&str>, topic: &str) -> bool {
        !topic.starts_with("ro/")
    }
    fn can_subscribe(&self, _: &str, _: Option<&str>, filter: &str) -> bool {
        filter != "forbidden"
    }
    fn can_receive(&self, client_id: &str, _: Option<&str>, topic: &str) -> bool {
        !(client_id == "nosy" && topic.starts_with("secret/"))
    }
}

#[tokio::test]
async fn authentication_and_authorization_hooks() {
    let b = Broker::new(BrokerConfig { sys_interval: 0, ..Default::default() }, Arc::new(Picky));
    let mut c = connect_packet(V3, "x");
    c.username = Some("bad".into());
    let (_cl, ack) = connect_with(&b, V3, c).await;
    assert_eq!(reason::connack_v311_code(ack.reason_code), 4);
    let mut nosy = connect(&b, V5, "nosy").await;
    nosy.subscribe(1, "#", QoS::AtMostOnce).await;
    nosy.send(Packet::Subscribe(Subscribe {
        packet_id: 2,
        filters: vec![("forbidden".into(), SubscriptionOptions::default())],
        ..Default::default()
    }))
    .await;
    match nosy.recv().await {
        Some(Packet::SubAck(a)) => assert_eq!(a.reason_codes, vec![reason::NOT_AUTHORIZED]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let mut p = connect(&b, V5, "p").await;
    p.send(Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        topic: "ro/x".into(),
        packet_id: Some(1),
        ..Default::default()
    }))
    .await;
    assert_eq!(p.recv().await, Some(Packet::PubAck(PubResp::with_reason(1, reason::NOT_AUTHORIZED))));
    p.pub_msg("secret/a", b"s", QoS::AtMostOnce, 0, false).await;
    p.pub_msg("open/a", b"o", QoS::AtMostOnce, 0, false).await;
    assert_eq!(nosy.publish().await.topic, "open/a");
}

#[tokio::test]
async fn shutdown_sends_0x8b() {
    let b = broker();
    let mut c = connect(&b, V5, "c").await;
    b.shutdown().await;
    c.expect_disconnect(reason::SERVER_SHUTTING_DOWN).await;
}

/// Idle connections are counted in bytes: keep the long-lived parts small.
/// The serving future of an accepted client is what its task keeps: with the
/// listener's slot (8 B), its state tag and tokio's ~100 bytes around it the
/// task must stay within jemalloc's 320-byte class. The Mailbox fits the
/// 128-byte class with its `Arc` counts. A field added here is paid by every
/// idle connection (docs/ARCHITECTURE.md "Memory per connection").
#[tokio::test]
async fn per_connection_state_stays_small() {
    let br = broker();
    let (a, srv) = tokio::io::duplex(1024);
    let mut client = Client { s: a, buf: BytesMut::new(), v: V3 };
    client.send(Packet::Connect(connect_packet(V3, "small"))).await;
    let serving = br.connect_client(srv, "127.0.0.1:1".parse().expect("addr")).await.expect("accepted");
    let serve = std::mem::size_of_val(&serving);
    let mailbox = std::mem::size_of::<super::session::Mailbox>();
    // As the listener runs it: over any transport.
    let conn = super::connection::conn_size::<crate::listener::ClientStream>();
    eprintln!("serving future {serve} B, Conn {conn} B, Mailbox {mailbox} B");
    // 184 B here (over a duplex stream): in a release build the listener's
    // task around it (ClientStream, the slot, tokio's header) is 320 B.
    assert!(serve <= 184, "serving future: {serve}");
    assert!(conn <= 168, "connection state: {conn}");
    assert!(mailbox <= 112, "Mailbox: {mailbox}");
    // With a user name: the user name and the remembered ACL answers, 48 B
    // in jemalloc's size classes (the will, aliases and QoS 2 state are
    // boxed apart).
    let cold = super::connection::cold_size();
    assert!(cold <= 48, "Conn's cold part: {cold}");
    // The CONNACK goes out once the connection is served.
    tokio::spawn(serving);
    assert!(matches!(client.recv().await, Some(Packet::ConnAck(_))));
}
