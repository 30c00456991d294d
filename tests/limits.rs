//! Limits and bad input: maximum connections, Maximum Packet Size both ways,
//! malformed and out-of-order packets (right MQTT 5 reason code, 3.1.1 close,
//! broker still serving), slow consumers.

mod common;

use std::time::Duration;

use common::raw::*;
use common::{Broker, BrokerCfg};
use tokio::time::Instant;

#[tokio::test]
async fn max_connections() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("max_connections = 2")).await;
    // The readiness probe's own connection may take a moment to be released.
    let (a, _) = RawClient::connect_ok(b.addr, &Conn::v5("mc-a")).await;
    let mut bb = common::wait_for("second connection accepted", common::DEADLINE, || async {
        let mut c = RawClient::tcp(b.addr).await;
        c.send(&Conn::v5("mc-b").encode()).await;
        match c.recv(Duration::from_secs(2)).await {
            Recv::Packet(Pkt::ConnAck { code: 0, .. }) => Some(c),
            _ => None,
        }
    })
    .await;
    for v5 in [true, false] {
        let mut c = RawClient::tcp(b.addr).await;
        c.v5 = v5;
        c.send(&Conn::version(v5, "mc-c").encode()).await;
        let got = c.expect_closed(common::DEADLINE).await;
        match got.as_slice() {
            [] => {}
            [Pkt::ConnAck { code, .. }] => {
                let want = if v5 { 0x97 } else { 0x03 };
                assert_eq!(*code, want, "v5={v5}: refused CONNACK code");
            }
            other => panic!("v5={v5}: third connection: {other:?}"),
        }
    }
    bb.ping().await;
    drop(a);
    // A slot frees up once the first client is gone.
    common::wait_for("slot freed", common::DEADLINE, || async {
        let mut c = RawClient::tcp(b.addr).await;
        c.send(&Conn::v5("mc-d").encode()).await;
        match c.recv(Duration::from_secs(2)).await {
            Recv::Packet(Pkt::ConnAck { code: 0, .. }) => Some(()),
            _ => None,
        }
    })
    .await;
}

// ------------------------------------------------------------ Maximum Packet Size

#[tokio::test]
async fn max_packet_size_inbound() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("max_packet_size = 1024")).await;
    for v5 in [false, true] {
        let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5(&format!("mps-sub-{v5}"))).await;
        s.sub("mps/t", 0).await;
        let (mut p, ack) = RawClient::connect(b.addr, &Conn::version(v5, &format!("mps-{v5}"))).await;
        if v5 {
            assert_eq!(connack_props(&ack).u32_of(MAXIMUM_PACKET_SIZE), Some(1024));
        }
        // Exactly 1024 bytes on the wire: accepted.
        let exact = if v5 { 1013 } else { 1014 };
        let m = Pub::new("mps/t", &vec![b'x'; exact], 0);
        assert_eq!(m.encode(v5).len(), 1024);
        p.publish(&m).await;
        assert_eq!(s.expect_pub().await.payload.len(), exact);
        // One byte more: refused.
        p.publish(&Pub::new("mps/t", &vec![b'x'; exact + 1], 0)).await;
        let got = p.expect_closed(common::DEADLINE).await;
        if v5 {
            assert!(
                matches!(got.as_slice(), [Pkt::Disconnect { code: 0x95, .. }]),
                "expected DISCONNECT 0x95 (packet too large), got {got:?}"
            );
        } else {
            assert!(got.is_empty(), "{got:?}");
        }
        s.expect_nothing(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn max_packet_size_outbound_v5() {
    let b = Broker::start().await;
    let (mut s, _) =
        RawClient::connect_ok(b.addr, &Conn::v5("mpo").prop(Prop::U32(MAXIMUM_PACKET_SIZE, 200))).await;
    s.sub("mpo/t", 1).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("mpo-pub")).await;
    p.publish_acked(&Pub::new("mpo/t", &[b'b'; 500], 1).pid(1)).await;
    p.publish_acked(&Pub::new("mpo/t", b"small", 1).pid(2)).await;
    let m = s.expect_pub().await;
    assert_eq!(m.payload, b"small", "a message larger than the client's Maximum Packet Size is dropped");
    s.send(&puback(m.pid.unwrap_or(0))).await;
    s.expect_nothing(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn large_message_within_limits() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("max_packet_size = 2000000")).await;
    for v5 in [false, true] {
        let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "big-sub")).await;
        s.sub("big/t", 1).await;
        let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "big-pub")).await;
        let payload: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
        p.publish_acked(&Pub::new("big/t", &payload, 1).pid(1)).await;
        let m = s.expect_pub().await;
        assert!(m.payload == payload, "1.5 MB payload intact");
    }
}

// ------------------------------------------------------------ malformed input

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// Acceptable MQTT 5 reason codes in the server's DISCONNECT.
    v5_codes: &'static [u8],
}

fn publish_raw(first: u8, topic: &[u8], pid: Option<u16>, props: Option<Vec<u8>>, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    put_bin(&mut b, topic);
    if let Some(p) = pid {
        b.extend_from_slice(&p.to_be_bytes());
    }
    if let Some(p) = props {
        b.extend_from_slice(&p);
    }
    b.extend_from_slice(payload);
    frame(first, &b)
}

fn cases(v5: bool) -> Vec<Case> {
    let empty_props = || if v5 { Some(vec![0u8]) } else { None };
    let mut v = vec![
        Case {
            name: "remaining length of 5 bytes",
            bytes: vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
            v5_codes: &[0x81],
        },
        Case {
            name: "PUBLISH QoS 3",
            bytes: publish_raw(0x36, b"a/b", Some(1), empty_props(), b"x"),
            v5_codes: &[0x81],
        },
        Case {
            name: "SUBSCRIBE with reserved flags 0000",
            bytes: {
                let mut s = subscribe(v5, 1, &[("a/b", 0)], &[]);
                s[0] = 0x80;
                s
            },
            v5_codes: &[0x81],
        },
        Case {
            name: "PUBLISH topic with ill-formed UTF-8",
            bytes: publish_raw(0x30, &[b'a', 0xC3, 0x28], None, empty_props(), b"x"),
            v5_codes: &[0x81],
        },
        Case {
            name: "PUBLISH topic with U+0000",
            bytes: publish_raw(0x30, b"a\0b", None, empty_props(), b"x"),
            v5_codes: &[0x81],
        },
        Case {
            name: "PUBLISH topic with a wildcard",
            bytes: publish_raw(0x30, b"a/+", None, empty_props(), b"x"),
            v5_codes: &[0x90, 0x82],
        },
        Case {
            name: "PUBLISH QoS 1 with packet id 0",
            bytes: publish_raw(0x32, b"a/b", Some(0), empty_props(), b"x"),
            v5_codes: &[0x81, 0x82],
        },
        Case {
            name: "SUBSCRIBE with no topic filter",
            bytes: subscribe(v5, 1, &[], &[]),
            v5_codes: &[0x82, 0x81],
        },
        Case {
            name: "SUBSCRIBE options with reserved bits",
            bytes: subscribe(v5, 1, &[("a/b", 0xC0)], &[]),
            v5_codes: &[0x81],
        },
        Case {
            name: "SUBSCRIBE QoS 3",
            bytes: subscribe(v5, 1, &[("a/b", 0x03)], &[]),
            v5_codes: &[0x82, 0x81],
        },
        Case { name: "reserved packet type 0", bytes: vec![0x00, 0x00], v5_codes: &[0x81, 0x82] },
        Case {
            name: "CONNACK sent by a client",
            bytes: vec![0x20, 0x02, 0x00, 0x00],
            v5_codes: &[0x81, 0x82],
        },
        Case {
            name: "PUBLISH truncated (topic length beyond the packet)",
            bytes: vec![0x30, 0x03, 0x00, 0x10, b'a'],
            v5_codes: &[0x81],
        },
    ];
    if v5 {
        v.extend([
            Case {
                name: "PUBLISH with Payload Format Indicator twice",
                bytes: publish_raw(
                    0x30,
                    b"a/b",
                    None,
                    Some(encode_props(&[Prop::Byte(PAYLOAD_FORMAT, 0), Prop::Byte(PAYLOAD_FORMAT, 0)])),
                    b"x",
                ),
                v5_codes: &[0x82],
            },
            Case {
                name: "PUBLISH property length beyond the packet",
                bytes: publish_raw(0x30, b"a/b", None, Some(vec![0x20, 0x01, 0x00]), b""),
                v5_codes: &[0x81],
            },
            Case {
                name: "PUBLISH with unknown property id 0x7F",
                bytes: publish_raw(0x30, b"a/b", None, Some(vec![0x02, 0x7F, 0x00]), b""),
                v5_codes: &[0x81],
            },
            Case {
                name: "PUBLISH from a client with a Subscription Identifier",
                bytes: publish_raw(
                    0x30,
                    b"a/b",
                    None,
                    Some(encode_props(&[Prop::VarInt(SUBSCRIPTION_ID, 3)])),
                    b"x",
                ),
                v5_codes: &[0x82],
            },
            Case {
                name: "SUBSCRIBE Retain Handling 3",
                bytes: subscribe(true, 1, &[("a/b", 0x30)], &[]),
                v5_codes: &[0x82, 0x81],
            },
        ]);
    }
    v
}

async fn malformed(v5: bool) {
    let mut b = Broker::start().await;
    let (mut bystander, _) = RawClient::connect_ok(b.addr, &Conn::v5("bystander")).await;
    bystander.sub("still/here", 0).await;
    let mut failures = Vec::new();
    for case in cases(v5) {
        let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "bad")).await;
        c.send(&case.bytes).await;
        let got = match c.closed_within(common::DEADLINE).await {
            Some(g) => g,
            None => {
                failures.push(format!("{}: connection not closed", case.name));
                continue;
            }
        };
        if v5 {
            match got.as_slice() {
                [Pkt::Disconnect { code, .. }] if case.v5_codes.contains(code) => {}
                other => failures.push(format!(
                    "{}: expected DISCONNECT with one of {:02x?} then close, got {other:?}",
                    case.name, case.v5_codes
                )),
            }
        } else if !got.is_empty() {
            failures.push(format!("{}: 3.1.1 expects a plain close, got {got:?}", case.name));
        }
        if !b.alive() {
            panic!("broker process died on: {}", case.name);
        }
    }
    // Still serving: existing and new clients.
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v3("after-bad")).await;
    p.publish(&Pub::new("still/here", b"yes", 0)).await;
    assert_eq!(bystander.expect_pub().await.payload, b"yes");
    assert!(failures.is_empty(), "v5={v5}: {} case(s) wrong:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test]
async fn malformed_packets_v311() {
    malformed(false).await;
}

#[tokio::test]
async fn malformed_packets_v5() {
    malformed(true).await;
}

#[tokio::test]
async fn garbage_before_connect() {
    let mut b = Broker::start().await;
    let garbage: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &[0xFF; 64],
        &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
        &[0x10, 0x05, 0x00, 0x04, b'M', b'Q', b'T'],
        &[0x10, 0x00],
    ];
    for g in garbage {
        let mut c = RawClient::tcp(b.addr).await;
        c.v5 = false;
        let _ = c.try_send(g).await;
        // Either the server closes, or (truncated input) keeps waiting; it must never accept.
        if let Recv::Packet(Pkt::ConnAck { code: 0, .. }) = c.recv(Duration::from_millis(1500)).await {
            panic!("garbage accepted: {g:?}");
        }
        assert!(b.alive(), "broker died on {g:?}");
    }
    let (mut ok, _) = RawClient::connect_ok(b.addr, &Conn::v5("after-garbage")).await;
    ok.ping().await;
}

#[tokio::test]
async fn connect_timeout_closes_silent_socket() {
    // A socket that never sends CONNECT is closed (the broker picks the timeout; 10 s default).
    let b = Broker::start().await;
    let mut c = RawClient::tcp(b.addr).await;
    c.send(&[0x10]).await; // a partial header, then silence
    let start = Instant::now();
    let got = c.expect_closed(Duration::from_secs(15)).await;
    assert!(got.is_empty());
    assert!(start.elapsed() < Duration::from_secs(15));
}

// ------------------------------------------------------------ slow consumer

#[tokio::test]
async fn slow_consumer_does_not_stall_others() {
    let mut b = Broker::start_with(BrokerCfg::new().mqtt("outbox_capacity = 100")).await;
    // Two subscribers that never read (QoS 0 and QoS 1).
    let mut slow = Vec::new();
    for (i, q) in [0u8, 1].into_iter().enumerate() {
        let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5(&format!("slow{i}"))).await;
        s.sub("slow/t", q).await;
        slow.push(s);
    }
    let (mut fast, _) = RawClient::connect_ok(b.addr, &Conn::v3("fast")).await;
    fast.sub("slow/t", 1).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("slow-pub")).await;
    let rss_before = b.rss_kib();
    let payload = vec![b'z'; 32 * 1024];
    let n = 800u32; // ~26 MB: far beyond what socket buffers absorb
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    for i in 0..n {
        let mut body = i.to_be_bytes().to_vec();
        body.extend_from_slice(&payload);
        p.publish_acked(&Pub::new("slow/t", &body, 1).pid((i % 60000) as u16 + 1)).await;
        let m = fast.expect_pub().await;
        fast.send(&puback(m.pid.unwrap_or(0))).await;
        assert_eq!(m.payload.len(), body.len());
        assert_eq!(&m.payload[..4], &i.to_be_bytes(), "fast subscriber got message out of order");
        assert!(Instant::now() < deadline, "publishing stalled: only {i} of {n} in 60 s");
    }
    assert!(b.alive());
    // Bounded: the ~26 MB the two slow subscribers never read must not all be
    // held for them (each may hold its outbox of 100 messages = 3.2 MB, plus its
    // in-flight window and socket buffers).
    if let (Some(before), Some(after)) = (rss_before, b.rss_kib()) {
        eprintln!(
            "broker RSS before {before} KiB, after {after} KiB; {n} messages in {:?}",
            started.elapsed()
        );
        assert!(
            after.saturating_sub(before) < 40 * 1024,
            "broker memory grew by {} KiB for two slow consumers: not bounded",
            after - before
        );
    }
    let (mut other, _) = RawClient::connect_ok(b.addr, &Conn::v5("slow-after")).await;
    other.ping().await;
    // The slow subscribers did get data (until their buffers filled), so the
    // test did exercise a consumer that stopped reading.
    for s in slow.iter_mut() {
        match s.recv(Duration::from_secs(2)).await {
            Recv::Packet(Pkt::Publish(m)) => assert_eq!(m.payload.len(), 4 + payload.len()),
            Recv::Closed => {} // disconnected as a slow consumer: also bounded
            other => panic!("slow subscriber: {other:?}"),
        }
    }
}
