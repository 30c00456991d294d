//! Persistent sessions: 3.1.1 clean session 0 and 5.0 session expiry, offline
//! queues and their limits, DUP redelivery on resume, QoS 2 state across a
//! reconnect, QoS 0 offline queueing, session expiry.

mod common;

use std::time::Duration;

use common::raw::*;
use common::{Broker, BrokerCfg};

fn persistent(v5: bool, id: &str) -> Conn {
    let c = Conn::version(v5, id).clean(false);
    if v5 {
        c.expiry(60)
    } else {
        c
    }
}

/// Resumes without clean start (v5 keeps session expiry 60).
fn resume(v5: bool, id: &str) -> Conn {
    persistent(v5, id)
}

async fn offline_queue(v5: bool) {
    let b = Broker::start().await;
    let id = format!("offq-{v5}");
    let (mut s, sp) = RawClient::connect_ok(b.addr, &persistent(v5, &id)).await;
    assert!(!sp, "new session");
    s.sub("offq/t", 2).await;
    s.disconnect().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "offq-pub")).await;
    for (i, q) in [1u8, 2, 1].into_iter().enumerate() {
        p.publish_acked(&Pub::new("offq/t", format!("m{i}").as_bytes(), q).pid(i as u16 + 1)).await;
    }
    let (mut s, sp) = RawClient::connect_ok(b.addr, &resume(v5, &id)).await;
    assert!(sp, "session present on resume");
    for (i, q) in [1u8, 2, 1].into_iter().enumerate() {
        let m = s.recv_pub_auto().await;
        assert_eq!(m.payload, format!("m{i}").as_bytes(), "queued messages in order");
        assert_eq!(m.qos, q);
    }
    // The subscription survived: live messages flow too.
    p.publish_acked(&Pub::new("offq/t", b"live", 1).pid(9)).await;
    let m = s.recv_pub_auto().await;
    assert_eq!(m.payload, b"live");
}

#[tokio::test]
async fn offline_queue_delivered_on_reconnect_v311() {
    offline_queue(false).await;
}

#[tokio::test]
async fn offline_queue_delivered_on_reconnect_v5() {
    offline_queue(true).await;
}

#[tokio::test]
async fn clean_start_discards_session() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let id = format!("discard-{v5}");
        let (mut s, _) = RawClient::connect_ok(b.addr, &persistent(v5, &id)).await;
        s.sub("discard/t", 1).await;
        s.disconnect().await;
        let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "discard-pub")).await;
        p.publish_acked(&Pub::new("discard/t", b"queued", 1).pid(1)).await;
        let (mut s, sp) = RawClient::connect_ok(b.addr, &Conn::version(v5, &id).clean(true)).await;
        assert!(!sp, "clean start: no session present");
        s.expect_nothing(Duration::from_millis(400)).await;
        // And the old subscription is gone.
        s.sub("discard/end", 0).await;
        p.publish_acked(&Pub::new("discard/t", b"after", 1).pid(2)).await;
        p.publish(&Pub::new("discard/end", b"end", 0)).await;
        let m = s.expect_pub().await;
        assert_eq!(m.payload, b"end", "old subscription must be gone");
    }
}

#[tokio::test]
async fn non_persistent_v5_session_ends_with_connection() {
    let b = Broker::start().await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("np5").clean(false)).await;
    s.sub("np/t", 1).await;
    s.disconnect().await;
    // Session Expiry Interval absent = 0: nothing is kept even with clean start 0.
    let (_s, sp) = RawClient::connect_ok(b.addr, &Conn::v5("np5").clean(false)).await;
    assert!(!sp);
}

#[tokio::test]
async fn session_expiry_removes_session() {
    let b = Broker::start().await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("sexp").clean(false).expiry(1)).await;
    s.sub("sexp/t", 1).await;
    s.disconnect().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("sexp-pub")).await;
    p.publish_acked(&Pub::new("sexp/t", b"q", 1).pid(1)).await;
    // The expiry under test needs the time to pass (1 s + tick period).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (mut s, sp) = RawClient::connect_ok(b.addr, &Conn::v5("sexp").clean(false).expiry(60)).await;
    assert!(!sp, "expired session must be gone");
    s.expect_nothing(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn session_resumed_before_expiry() {
    let b = Broker::start().await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("sres").clean(false).expiry(3)).await;
    s.sub("sres/t", 1).await;
    s.disconnect().await;
    let (_s, sp) = RawClient::connect_ok(b.addr, &Conn::v5("sres").clean(false).expiry(3)).await;
    assert!(sp);
}

#[tokio::test]
async fn disconnect_sets_session_expiry_zero() {
    let b = Broker::start().await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("dse").clean(false).expiry(60)).await;
    s.sub("dse/t", 1).await;
    s.send(&disconnect(Some(0), &[Prop::U32(SESSION_EXPIRY, 0)])).await;
    s.expect_closed(common::DEADLINE).await;
    let (_s, sp) = RawClient::connect_ok(b.addr, &Conn::v5("dse").clean(false).expiry(60)).await;
    assert!(!sp, "DISCONNECT with Session Expiry 0 ends the session");
}

#[tokio::test]
async fn disconnect_cannot_raise_expiry_from_zero() {
    let b = Broker::start().await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::v5("dsz")).await;
    s.send(&disconnect(Some(0), &[Prop::U32(SESSION_EXPIRY, 30)])).await;
    let got = s.expect_closed(common::DEADLINE).await;
    assert!(
        matches!(got.as_slice(), [Pkt::Disconnect { code: 0x82, .. }]),
        "expected DISCONNECT 0x82 (protocol error), got {got:?}"
    );
}

#[tokio::test]
async fn session_expiry_capped_by_max_session_expiry() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("max_session_expiry = 10")).await;
    let (_c, ack) = RawClient::connect(b.addr, &Conn::v5("cap").clean(false).expiry(3600)).await;
    assert_eq!(connack_code(&ack), 0);
    assert_eq!(connack_props(&ack).u32_of(SESSION_EXPIRY), Some(10), "CONNACK announces the capped expiry");
}

// ------------------------------------------------------------ redelivery on resume

async fn dup_redelivery_qos1(v5: bool) {
    let b = Broker::start().await;
    let id = format!("dup1-{v5}");
    let (mut s, _) = RawClient::connect_ok(b.addr, &persistent(v5, &id)).await;
    s.sub("dup/t", 1).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "dup-pub")).await;
    p.publish_acked(&Pub::new("dup/t", b"unacked", 1).pid(1)).await;
    let first = s.expect_pub().await;
    assert!(!first.dup);
    drop(s); // no PUBACK
    let (mut s, sp) = RawClient::connect_ok(b.addr, &resume(v5, &id)).await;
    assert!(sp);
    let again = s.expect_pub().await;
    assert_eq!(again.payload, b"unacked");
    assert!(again.dup, "resent with DUP=1");
    assert_eq!(again.pid, first.pid, "resent with the same packet id");
    assert_eq!(again.qos, 1);
    s.send(&puback(again.pid.unwrap_or(0))).await;
    // Acknowledged now: a third connection gets nothing.
    s.disconnect().await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &resume(v5, &id)).await;
    s.expect_nothing(Duration::from_millis(400)).await;
}

#[tokio::test]
async fn dup_redelivery_on_resume_v311() {
    dup_redelivery_qos1(false).await;
}

#[tokio::test]
async fn dup_redelivery_on_resume_v5() {
    dup_redelivery_qos1(true).await;
}

#[tokio::test]
async fn qos2_outbound_resumes_with_pubrel() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let id = format!("q2res-{v5}");
        let (mut s, _) = RawClient::connect_ok(b.addr, &persistent(v5, &id)).await;
        s.sub("q2res/t", 2).await;
        let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "q2res-pub")).await;
        p.publish_acked(&Pub::new("q2res/t", b"x", 2).pid(1)).await;
        let m = s.expect_pub().await;
        let pid = m.pid.expect("pid");
        s.send(&pubrec(pid)).await;
        match s.expect(WAIT).await {
            Pkt::PubRel { pid: got, .. } => assert_eq!(got, pid),
            other => panic!("{other:?}"),
        }
        drop(s); // no PUBCOMP
        let (mut s, sp) = RawClient::connect_ok(b.addr, &resume(v5, &id)).await;
        assert!(sp);
        match s.expect(WAIT).await {
            Pkt::PubRel { pid: got, .. } => assert_eq!(got, pid, "PUBREL resent for the same id"),
            other => panic!("v5={v5}: expected PUBREL on resume, got {other:?}"),
        }
        s.send(&pubcomp(pid)).await;
        s.expect_nothing(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn qos2_inbound_exactly_once_across_reconnect() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let (mut s, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "q2in-sub")).await;
        s.sub("q2in/t", 2).await;
        let id = format!("q2in-pub-{v5}");
        let (mut p, _) = RawClient::connect_ok(b.addr, &persistent(v5, &id)).await;
        let msg = Pub::new("q2in/t", b"once", 2).pid(5);
        p.publish(&msg).await;
        assert!(matches!(p.expect(WAIT).await, Pkt::PubRec { pid: 5, .. }));
        drop(p); // lost before PUBREL
        let (mut p, sp) = RawClient::connect_ok(b.addr, &resume(v5, &id)).await;
        assert!(sp);
        p.publish(&msg.clone().dup(true)).await;
        assert!(matches!(p.expect(WAIT).await, Pkt::PubRec { pid: 5, .. }));
        p.send(&pubrel(5)).await;
        assert!(matches!(p.expect(WAIT).await, Pkt::PubComp { pid: 5, code: 0, .. }));
        p.publish_acked(&Pub::new("q2in/t", b"end", 1).pid(6)).await;
        let mut got = Vec::new();
        loop {
            let m = s.recv_pub_auto().await;
            if m.payload == b"end" {
                break;
            }
            got.push(m.payload);
        }
        assert_eq!(got, vec![b"once".to_vec()], "v5={v5}: exactly once");
    }
}

// ------------------------------------------------------------ queue limits

#[tokio::test]
async fn offline_queue_limit_drops_new_messages() {
    let b =
        Broker::start_with(BrokerCfg::new().mqtt("max_queued_messages = 3").mqtt("max_inflight = 2")).await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &persistent(true, "qlim")).await;
    s.sub("qlim/t", 1).await;
    s.disconnect().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("qlim-pub")).await;
    for i in 0..8u16 {
        p.publish_acked(&Pub::new("qlim/t", format!("{i}").as_bytes(), 1).pid(i + 1)).await;
    }
    let (mut s, _) = RawClient::connect_ok(b.addr, &resume(true, "qlim")).await;
    let mut got = Vec::new();
    loop {
        match s.recv(Duration::from_millis(500)).await {
            Recv::Packet(Pkt::Publish(m)) => {
                s.send(&puback(m.pid.unwrap_or(0))).await;
                got.push(String::from_utf8_lossy(&m.payload).to_string());
            }
            Recv::Timeout => break,
            other => panic!("{other:?}"),
        }
    }
    // Queue limit 3, plus at most the in-flight window of 2 (a broker may fill
    // the window while the client is offline). Policy when full: drop the new
    // message, so what arrives is the oldest ones, in order.
    let all: Vec<String> = (0..8).map(|i| i.to_string()).collect();
    assert!((3..=5).contains(&got.len()), "queue limit not applied: got {got:?}");
    assert_eq!(got[..], all[..got.len()], "oldest messages kept, in order");
}

#[tokio::test]
async fn offline_queue_byte_limit() {
    let b =
        Broker::start_with(BrokerCfg::new().mqtt("max_queued_bytes = 1000").mqtt("max_inflight = 1")).await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &persistent(false, "qbytes")).await;
    s.sub("qbytes/t", 1).await;
    s.disconnect().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v3("qbytes-pub")).await;
    for i in 0..10u16 {
        p.publish_acked(&Pub::new("qbytes/t", &[b'a' + i as u8; 300], 1).pid(i + 1)).await;
    }
    let (mut s, _) = RawClient::connect_ok(b.addr, &resume(false, "qbytes")).await;
    let mut n = 0;
    loop {
        match s.recv(Duration::from_millis(500)).await {
            Recv::Packet(Pkt::Publish(m)) => {
                s.send(&puback(m.pid.unwrap_or(0))).await;
                n += 1;
            }
            Recv::Timeout => break,
            other => panic!("{other:?}"),
        }
    }
    // 1 in flight + what fits in 1000 bytes of queue (3 messages of ~300 bytes).
    assert!((2..=4).contains(&n), "window 1 + 1000-byte queue of 300-byte messages, got {n}");
}

#[tokio::test]
async fn qos0_not_queued_offline_by_default() {
    let b = Broker::start().await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &persistent(false, "q0off")).await;
    s.sub("q0off/t", 1).await;
    s.disconnect().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v3("q0off-pub")).await;
    p.publish(&Pub::new("q0off/t", b"qos0", 0)).await;
    p.publish_acked(&Pub::new("q0off/t", b"qos1", 1).pid(1)).await;
    let (mut s, _) = RawClient::connect_ok(b.addr, &resume(false, "q0off")).await;
    let m = s.expect_pub().await;
    assert_eq!(m.payload, b"qos1", "QoS 0 must not be queued for an offline session by default");
}

#[tokio::test]
async fn qos0_queued_offline_when_enabled() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("queue_qos0_offline = true")).await;
    for v5 in [false, true] {
        let id = format!("q0on-{v5}");
        let (mut s, _) = RawClient::connect_ok(b.addr, &persistent(v5, &id)).await;
        s.sub("q0on/t", 1).await;
        s.disconnect().await;
        let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "q0on-pub")).await;
        p.publish(&Pub::new("q0on/t", b"qos0", 0)).await;
        p.publish_acked(&Pub::new("q0on/t", b"qos1", 1).pid(1)).await;
        let (mut s, _) = RawClient::connect_ok(b.addr, &resume(v5, &id)).await;
        let mut got = Vec::new();
        for _ in 0..2 {
            let m = s.recv_pub_auto().await;
            got.push((m.payload, m.qos));
        }
        got.sort();
        assert_eq!(got, vec![(b"qos0".to_vec(), 0), (b"qos1".to_vec(), 1)], "v5={v5}");
        s.disconnect().await;
    }
}

#[tokio::test]
async fn shared_subscription_persistent_member_queues_when_offline() {
    let b = Broker::start().await;
    let (mut m, _) = RawClient::connect_ok(b.addr, &persistent(true, "shq")).await;
    m.sub("$share/g/shq/t", 1).await;
    m.disconnect().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("shq-pub")).await;
    p.publish_acked(&Pub::new("shq/t", b"for-the-group", 1).pid(1)).await;
    let (mut m, sp) = RawClient::connect_ok(b.addr, &resume(true, "shq")).await;
    assert!(sp);
    assert_eq!(m.expect_pub().await.payload, b"for-the-group");
}

#[tokio::test]
async fn resume_with_smaller_receive_maximum() {
    let b = Broker::start().await;
    let conn = |rm: u16| Conn::v5("rmres").clean(false).expiry(60).prop(Prop::U16(RECEIVE_MAXIMUM, rm));
    let (mut s, _) = RawClient::connect_ok(b.addr, &conn(10)).await;
    s.sub("rmres/t", 1).await;
    s.disconnect().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("rmres-pub")).await;
    for i in 0..5u16 {
        p.publish_acked(&Pub::new("rmres/t", format!("{i}").as_bytes(), 1).pid(i + 1)).await;
    }
    let (mut s, sp) = RawClient::connect_ok(b.addr, &conn(2)).await;
    assert!(sp);
    let m0 = s.expect_pub().await;
    let m1 = s.expect_pub().await;
    s.expect_nothing(Duration::from_millis(500)).await;
    let mut got = vec![m0.payload.clone(), m1.payload.clone()];
    s.send(&puback(m0.pid.unwrap_or(0))).await;
    s.send(&puback(m1.pid.unwrap_or(0))).await;
    for _ in 0..3 {
        got.push(s.recv_pub_auto().await.payload);
    }
    let want: Vec<Vec<u8>> = (0..5).map(|i: u8| vec![b'0' + i]).collect();
    assert_eq!(got, want, "in order, never more than 2 unacknowledged");
}

#[tokio::test]
async fn several_inflight_resent_in_order_with_same_ids() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let id = format!("multi-{v5}");
        let (mut s, _) = RawClient::connect_ok(b.addr, &persistent(v5, &id)).await;
        s.sub("multi/t", 1).await;
        let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "multi-pub")).await;
        for i in 0..3u16 {
            p.publish_acked(&Pub::new("multi/t", format!("{i}").as_bytes(), 1).pid(i + 1)).await;
        }
        let mut first = Vec::new();
        for _ in 0..3 {
            let m = s.expect_pub().await;
            first.push((m.pid, m.payload));
        }
        drop(s);
        let (mut s, _) = RawClient::connect_ok(b.addr, &resume(v5, &id)).await;
        let mut again = Vec::new();
        for _ in 0..3 {
            let m = s.expect_pub().await;
            assert!(m.dup, "v5={v5}: resent with DUP");
            again.push((m.pid, m.payload));
        }
        assert_eq!(again, first, "v5={v5}: same ids, same order");
        for (pid, _) in &again {
            s.send(&puback(pid.unwrap_or(0))).await;
        }
        s.ping().await;
    }
}
