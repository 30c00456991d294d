//! SUBSCRIBE / UNSUBSCRIBE: wildcards, `$` topics, subscription options,
//! subscription identifiers, overlapping and shared subscriptions, retained
//! messages, $SYS.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::raw::*;
use common::{Broker, BrokerCfg};
use tokio::time::Instant;

async fn ack(c: &mut RawClient, m: &Pub) {
    if m.qos == 1 {
        c.send(&puback(m.pid.unwrap_or(0))).await;
    }
}

/// Receives PUBLISHes (acking QoS 1) until one with payload `marker` arrives;
/// returns those before it.
async fn until_marker(c: &mut RawClient, marker: &[u8]) -> Vec<Pub> {
    let mut got = Vec::new();
    loop {
        let m = c.expect_pub().await;
        ack(c, &m).await;
        if m.payload == marker {
            return got;
        }
        got.push(m);
    }
}

async fn wildcards(v5: bool) {
    let b = Broker::start().await;
    let (mut plus, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "w-plus")).await;
    plus.sub("a/+/c", 0).await;
    let (mut hash, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "w-hash")).await;
    hash.sub("a/#", 0).await;
    let (mut all, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "w-all")).await;
    all.sub("#", 0).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "w-pub")).await;
    for t in ["a/b/c", "a/b/c/d", "a", "a/x/c", "b/c", "a//c"] {
        p.publish(&Pub::new(t, t.as_bytes(), 0)).await;
    }
    // Marker matched by all three filters: everything before it has been routed.
    p.publish(&Pub::new("a/b/c", b"end", 0)).await;
    let topics = |v: Vec<Pub>| v.into_iter().map(|m| m.topic).collect::<Vec<_>>();
    assert_eq!(topics(until_marker(&mut plus, b"end").await), vec!["a/b/c", "a/x/c", "a//c"]);
    // "a/#" matches the parent "a" too.
    assert_eq!(topics(until_marker(&mut hash, b"end").await), vec!["a/b/c", "a/b/c/d", "a", "a/x/c", "a//c"]);
    assert_eq!(
        topics(until_marker(&mut all, b"end").await),
        vec!["a/b/c", "a/b/c/d", "a", "a/x/c", "b/c", "a//c"]
    );
}

#[tokio::test]
async fn wildcards_v311() {
    wildcards(false).await;
}

#[tokio::test]
async fn wildcards_v5() {
    wildcards(true).await;
}

#[tokio::test]
async fn dollar_topics_not_matched_by_leading_wildcard() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let (mut all, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "dollar-all")).await;
        all.subscribe(1, &[("#", 0), ("+/x", 0)], &[]).await;
        let (mut dollar, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "dollar-d")).await;
        dollar.sub("$test/#", 0).await;
        let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "dollar-pub")).await;
        p.publish(&Pub::new("$test/x", b"dollar", 0)).await;
        p.publish(&Pub::new("plain/x", b"end", 0)).await;
        p.publish(&Pub::new("$test/end", b"end", 0)).await;
        let before = until_marker(&mut all, b"end").await;
        assert!(before.is_empty(), "'#' or '+/x' matched a $ topic: {before:?}");
        let d = until_marker(&mut dollar, b"end").await;
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].topic, "$test/x");
    }
}

#[tokio::test]
async fn sys_topics_present_and_not_matched_by_hash() {
    let b = Broker::start_with(BrokerCfg::new().mqtt("sys_interval = 1")).await;
    let (mut all, _) = RawClient::connect_ok(b.addr, &Conn::v5("sys-all")).await;
    all.sub("#", 0).await;
    let (mut sys, _) = RawClient::connect_ok(b.addr, &Conn::v3("sys-watch")).await;
    sys.sub("$SYS/#", 0).await;
    let want = [
        "$SYS/broker/version",
        "$SYS/broker/uptime",
        "$SYS/broker/clients/connected",
        "$SYS/broker/messages/received",
        "$SYS/broker/messages/sent",
        "$SYS/broker/bytes/received",
        "$SYS/broker/bytes/sent",
    ];
    let mut seen: HashMap<String, Vec<u8>> = HashMap::new();
    let connected = |seen: &HashMap<String, Vec<u8>>| -> u64 {
        seen.get("$SYS/broker/clients/connected")
            .and_then(|v| String::from_utf8_lossy(v).trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(4);
    // Values are republished every interval: wait for all topics and for the
    // count to include this test's two clients.
    while !want.iter().all(|t| seen.contains_key(*t)) || connected(&seen) < 2 {
        match sys.recv(deadline.saturating_duration_since(Instant::now())).await {
            Recv::Packet(Pkt::Publish(m)) => {
                seen.insert(m.topic, m.payload);
            }
            Recv::Packet(_) => {}
            other => {
                let mut missing: Vec<&str> =
                    want.iter().copied().filter(|t| !seen.contains_key(*t)).collect();
                missing.sort();
                panic!(
                    "missing $SYS topics {missing:?} or clients/connected < 2 ({other:?}); got {:?}",
                    seen.iter()
                        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).to_string()))
                        .collect::<Vec<_>>()
                );
            }
        }
    }
    assert!(String::from_utf8_lossy(&seen["$SYS/broker/uptime"]).contains("second"));
    match all.recv(Duration::from_millis(200)).await {
        Recv::Timeout => {}
        other => panic!("'#' subscriber received {other:?}"),
    }
}

// ------------------------------------------------------------ subscription options

#[tokio::test]
async fn no_local_v5() {
    let b = Broker::start().await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v5("nolocal")).await;
    c.subscribe(1, &[("nl/t", sub_opts(0, true, false, 0)), ("nl/end", 0)], &[]).await;
    c.publish(&Pub::new("nl/t", b"own", 0)).await;
    c.publish(&Pub::new("nl/end", b"end", 0)).await;
    let before = until_marker(&mut c, b"end").await;
    assert!(before.is_empty(), "No Local subscription got its own message: {before:?}");
    // Another client's message is delivered.
    let (mut o, _) = RawClient::connect_ok(b.addr, &Conn::v5("nolocal-other")).await;
    o.publish(&Pub::new("nl/t", b"other", 0)).await;
    assert_eq!(c.expect_pub().await.payload, b"other");
}

#[tokio::test]
async fn without_no_local_own_messages_delivered() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "local")).await;
        c.sub("loc/t", 0).await;
        c.publish(&Pub::new("loc/t", b"own", 0)).await;
        assert_eq!(c.expect_pub().await.payload, b"own");
    }
}

#[tokio::test]
async fn retain_as_published() {
    let b = Broker::start().await;
    let (mut rap, _) = RawClient::connect_ok(b.addr, &Conn::v5("rap1")).await;
    rap.subscribe(1, &[("rap/t", sub_opts(0, false, true, 0))], &[]).await;
    let (mut norap, _) = RawClient::connect_ok(b.addr, &Conn::v5("rap0")).await;
    norap.sub("rap/t", 0).await;
    let (mut v3, _) = RawClient::connect_ok(b.addr, &Conn::v3("rap3")).await;
    v3.sub("rap/t", 0).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("rap-pub")).await;
    p.publish(&Pub::new("rap/t", b"r", 0).retain(true)).await;
    assert!(rap.expect_pub().await.retain, "Retain As Published keeps the flag");
    assert!(!norap.expect_pub().await.retain, "live delivery clears the retain flag");
    assert!(!v3.expect_pub().await.retain, "3.1.1 live delivery clears the retain flag");
    // Retained delivery on subscribe always has the flag. The publish was QoS 0
    // (no acknowledgement to order against): poll until it is stored.
    let m = common::wait_for("retained message stored", common::DEADLINE, || async {
        let (mut late, _) = RawClient::connect_ok(b.addr, &Conn::v3("rap-late")).await;
        late.sub("rap/t", 0).await;
        match late.recv(Duration::from_millis(300)).await {
            Recv::Packet(Pkt::Publish(m)) => Some(m),
            _ => None,
        }
    })
    .await;
    assert!(m.retain);
    assert_eq!(m.payload, b"r");
}

#[tokio::test]
async fn retain_handling_0_1_2() {
    let b = Broker::start().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("rh-pub")).await;
    p.publish_acked(&Pub::new("rh/t", b"kept", 1).pid(1).retain(true)).await;
    p.publish_acked(&Pub::new("rh/marker", b"end", 1).pid(2).retain(true)).await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v5("rh")).await;
    // Each SUBSCRIBE names rh/t then the marker (retain handling 0): the marker's
    // retained message comes after any for rh/t.
    let round = |rh: u8| {
        let filters = [("rh/t", sub_opts(0, false, false, rh)), ("rh/marker", 0)];
        subscribe(true, 1, &filters, &[])
    };
    for (rh, want) in [(0u8, 1usize), (0, 1), (1, 0), (2, 0)] {
        c.send(&round(rh)).await;
        assert!(matches!(c.expect(WAIT).await, Pkt::SubAck { .. }));
        let got = until_marker(&mut c, b"end").await;
        assert_eq!(got.len(), want, "retain handling {rh} on an existing subscription: {got:?}");
    }
    // Retain handling 1 on a new subscription sends; 2 on a new one does not.
    let (mut n1, _) = RawClient::connect_ok(b.addr, &Conn::v5("rh-new1")).await;
    n1.send(&subscribe(true, 1, &[("rh/t", sub_opts(0, false, false, 1)), ("rh/marker", 0)], &[])).await;
    n1.expect(WAIT).await;
    assert_eq!(until_marker(&mut n1, b"end").await.len(), 1, "retain handling 1, new subscription");
    let (mut n2, _) = RawClient::connect_ok(b.addr, &Conn::v5("rh-new2")).await;
    n2.send(&subscribe(true, 1, &[("rh/t", sub_opts(0, false, false, 2)), ("rh/marker", 0)], &[])).await;
    n2.expect(WAIT).await;
    assert_eq!(until_marker(&mut n2, b"end").await.len(), 0, "retain handling 2");
}

#[tokio::test]
async fn subscription_identifiers_v5() {
    let b = Broker::start().await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v5("subid")).await;
    c.subscribe(1, &[("sid/+", 1)], &[Prop::VarInt(SUBSCRIPTION_ID, 5)]).await;
    c.subscribe(2, &[("sid/b", 1)], &[Prop::VarInt(SUBSCRIPTION_ID, 268_435_455)]).await;
    c.subscribe(3, &[("sid/#", 0)], &[]).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("subid-pub")).await;
    p.publish_acked(&Pub::new("sid/a", b"a", 1).pid(1)).await;
    let m = c.expect_pub().await;
    ack(&mut c, &m).await;
    assert_eq!(m.props.sub_ids(), vec![5]);
    p.publish_acked(&Pub::new("sid/b", b"b", 1).pid(2)).await;
    p.publish_acked(&Pub::new("sid/end", b"end", 1).pid(3)).await;
    let got = until_marker(&mut c, b"end").await;
    // One copy carrying every matching identifier, or one copy per subscription (MQTT 5 3.3.4).
    let ids: BTreeSet<u32> = got.iter().flat_map(|m| m.props.sub_ids()).collect();
    assert_eq!(ids, BTreeSet::from([5, 268_435_455]), "{got:?}");
    if got.len() == 1 {
        assert_eq!(got[0].qos, 1, "single copy at the maximum QoS");
    }
}

#[tokio::test]
async fn overlapping_subscriptions_single_delivery_max_qos() {
    let b = Broker::start().await;
    for v5 in [false, true] {
        let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "overlap")).await;
        c.subscribe(1, &[("ov/+", 0), ("ov/#", 2), ("ov/t", 1)], &[]).await;
        let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "overlap-pub")).await;
        p.publish_acked(&Pub::new("ov/t", b"x", 2).pid(1)).await;
        p.publish_acked(&Pub::new("ov/t", b"end", 0)).await;
        let mut got = Vec::new();
        loop {
            let m = c.recv_pub_auto().await;
            if m.payload == b"end" {
                break;
            }
            got.push(m);
        }
        // The design (DESIGN.md / state contract) delivers one copy at the maximum QoS.
        assert_eq!(got.len(), 1, "v5={v5}: {got:?}");
        assert_eq!(got[0].qos, 2, "v5={v5}: maximum QoS of the matching subscriptions");
    }
}

#[tokio::test]
async fn invalid_filters_refused() {
    let b = Broker::start().await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v5("badfilter")).await;
    c.send(&subscribe(true, 1, &[("a/#/b", 0), ("ok/+", 1), ("a+", 0)], &[])).await;
    // A SUBACK with 0x8F (Topic Filter invalid) for the bad filters, or a
    // malformed-packet DISCONNECT: both are readings of MQTT 5 4.7 / 4.13.
    match c.recv(WAIT).await {
        Recv::Packet(Pkt::SubAck { codes, .. }) => {
            assert_eq!(codes, vec![0x8F, 1, 0x8F], "Topic Filter invalid")
        }
        Recv::Packet(Pkt::Disconnect { code, .. }) => {
            assert!(code == 0x81 || code == 0x82 || code == 0x8F, "DISCONNECT {code:#x}");
            c.expect_closed(common::DEADLINE).await;
        }
        other => panic!("invalid filter: expected SUBACK 0x8F or DISCONNECT, got {other:?}"),
    }
    let (mut c3, _) = RawClient::connect_ok(b.addr, &Conn::v3("badfilter3")).await;
    c3.send(&subscribe(false, 1, &[("a/#/b", 0)], &[])).await;
    match c3.recv(WAIT).await {
        Recv::Packet(Pkt::SubAck { codes, .. }) => assert_eq!(codes, vec![0x80]),
        Recv::Closed => {}
        other => panic!("3.1.1 invalid filter: SUBACK 0x80 or close, got {other:?}"),
    }
}

#[tokio::test]
async fn shared_subscription_no_local_is_protocol_error() {
    let b = Broker::start().await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v5("sharednl")).await;
    c.send(&subscribe(true, 1, &[("$share/g/t", sub_opts(0, true, false, 0))], &[])).await;
    let got = c.expect_closed(common::DEADLINE).await;
    assert!(
        matches!(got.as_slice(), [Pkt::Disconnect { code: 0x82, .. }]),
        "expected DISCONNECT 0x82, got {got:?}"
    );
}

#[tokio::test]
async fn unsubscribe_v5_and_v311() {
    let b = Broker::start().await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v5("unsub")).await;
    c.sub("un/t", 0).await;
    c.sub("un/end", 0).await;
    c.send(&unsubscribe(true, 2, &["un/t", "un/none"])).await;
    match c.expect(WAIT).await {
        Pkt::UnsubAck { pid: 2, codes, .. } => assert_eq!(codes, vec![0x00, 0x11]),
        other => panic!("{other:?}"),
    }
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("unsub-pub")).await;
    p.publish(&Pub::new("un/t", b"gone", 0)).await;
    p.publish(&Pub::new("un/end", b"end", 0)).await;
    assert!(until_marker(&mut c, b"end").await.is_empty());

    let (mut c3, _) = RawClient::connect_ok(b.addr, &Conn::v3("unsub3")).await;
    c3.sub("un3/t", 0).await;
    c3.send(&unsubscribe(false, 5, &["un3/t"])).await;
    match c3.expect(WAIT).await {
        Pkt::UnsubAck { pid: 5, codes, .. } => assert!(codes.is_empty(), "3.1.1 UNSUBACK has no payload"),
        other => panic!("{other:?}"),
    }
}

// ------------------------------------------------------------ shared subscriptions

async fn shared_spread(v5: bool) {
    let b = Broker::start().await;
    let mut members = Vec::new();
    for i in 0..3 {
        let (mut m, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, &format!("member{i}"))).await;
        m.sub("$share/grp/sh/t", 1).await;
        members.push(m);
    }
    let (mut plain, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "plain")).await;
    plain.sub("sh/t", 1).await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "shpub")).await;
    let n = 30u16;
    for i in 0..n {
        p.publish_acked(&Pub::new("sh/t", format!("{i}").as_bytes(), 1).pid(i + 1)).await;
    }
    let mut all = Vec::new();
    for _ in 0..n {
        let m = plain.expect_pub().await;
        ack(&mut plain, &m).await;
        all.push(m.payload);
    }
    assert_eq!(all.len(), n as usize, "the non-shared subscriber gets every message");
    let mut counts = Vec::new();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + common::DEADLINE;
    while seen.len() < n as usize && Instant::now() < deadline {
        for (i, m) in members.iter_mut().enumerate() {
            while let Recv::Packet(pk) = m.recv(Duration::from_millis(20)).await {
                if let Pkt::Publish(pb) = pk {
                    ack(m, &pb).await;
                    assert!(
                        seen.insert(pb.payload.clone()),
                        "message {:?} delivered twice to the group",
                        pb.payload
                    );
                    counts.push(i);
                }
            }
        }
    }
    assert_eq!(seen.len(), n as usize, "each message to exactly one group member");
    for i in 0..3 {
        let c = counts.iter().filter(|x| **x == i).count();
        assert!(c >= 3, "member {i} got only {c} of {n}: not spread over the members");
    }
}

#[tokio::test]
async fn shared_subscription_spread_v311() {
    shared_spread(false).await;
}

#[tokio::test]
async fn shared_subscription_spread_v5() {
    shared_spread(true).await;
}

#[tokio::test]
async fn shared_subscription_gets_no_retained() {
    let b = Broker::start().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("shr-pub")).await;
    p.publish_acked(&Pub::new("shr/t", b"retained", 1).pid(1).retain(true)).await;
    p.publish_acked(&Pub::new("shr/end", b"end", 1).pid(2).retain(true)).await;
    let (mut m, _) = RawClient::connect_ok(b.addr, &Conn::v5("shr-member")).await;
    m.send(&subscribe(true, 1, &[("$share/g/shr/t", 0), ("shr/end", 0)], &[])).await;
    m.expect(WAIT).await;
    assert!(until_marker(&mut m, b"end").await.is_empty());
}

// ------------------------------------------------------------ retained messages

async fn late_sub_get(b: &Broker, v5: bool, filter: &str, marker_topic: &str) -> Vec<Pub> {
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "late")).await;
    c.send(&subscribe(v5, 1, &[(filter, 1), (marker_topic, 0)], &[])).await;
    let ack = c.expect(WAIT).await;
    assert!(matches!(ack, Pkt::SubAck { .. }), "expected SUBACK, got {ack:?}");
    until_marker(&mut c, b"end").await
}

async fn retained_lifecycle(v5: bool) {
    let b = Broker::start().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::version(v5, "ret-pub")).await;
    p.publish_acked(&Pub::new("retm/end", b"end", 1).pid(9).retain(true)).await;
    p.publish_acked(&Pub::new("ret/t", b"one", 1).pid(1).retain(true)).await;
    let got = late_sub_get(&b, v5, "ret/t", "retm/end").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"one");
    assert!(got[0].retain);
    assert_eq!(got[0].qos, 1);
    // Replace.
    // QoS 0 has no acknowledgement to order a later subscriber after: poll until
    // the replacement is visible (it must be, within the deadline).
    p.publish_acked(&Pub::new("ret/t", b"two", 0).retain(true)).await;
    let got = common::wait_for("retained replaced by a QoS 0 publish", common::DEADLINE, || async {
        let got = late_sub_get(&b, v5, "ret/t", "retm/end").await;
        (got.len() == 1 && got[0].payload == b"two").then_some(got)
    })
    .await;
    assert_eq!(got.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), vec![b"two".to_vec()]);
    assert_eq!(got[0].qos, 0, "QoS of the retained message is the one it was published with");
    // A non-retained publish does not replace it.
    p.publish_acked(&Pub::new("ret/t", b"live", 1).pid(2)).await;
    let got = late_sub_get(&b, v5, "ret/#", "retm/end").await;
    assert_eq!(got.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), vec![b"two".to_vec()]);
    // Clear with an empty payload.
    p.publish_acked(&Pub::new("ret/t", b"", 1).pid(3).retain(true)).await;
    let got = late_sub_get(&b, v5, "ret/#", "retm/end").await;
    assert!(got.is_empty(), "cleared retained message still delivered: {got:?}");
}

#[tokio::test]
async fn retained_set_replace_clear_v311() {
    retained_lifecycle(false).await;
}

#[tokio::test]
async fn retained_set_replace_clear_v5() {
    retained_lifecycle(true).await;
}

#[tokio::test]
async fn retained_wildcard_subscribe_gets_all() {
    let b = Broker::start().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v3("retw-pub")).await;
    for t in ["rw/a", "rw/b/c", "rw/d"] {
        p.publish_acked(&Pub::new(t, t.as_bytes(), 1).pid(1).retain(true)).await;
    }
    p.publish_acked(&Pub::new("rwm/end", b"end", 1).pid(1).retain(true)).await;
    let got = late_sub_get(&b, false, "rw/#", "rwm/end").await;
    let topics: BTreeSet<String> = got.into_iter().map(|m| m.topic).collect();
    assert_eq!(topics, BTreeSet::from(["rw/a".to_string(), "rw/b/c".into(), "rw/d".into()]));
}

#[tokio::test]
async fn retained_message_expiry() {
    let b = Broker::start().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("retexp-pub")).await;
    p.publish_acked(&Pub::new("retexpm/end", b"end", 1).pid(9).retain(true)).await;
    p.publish_acked(
        &Pub::new("retexp/t", b"short", 1).pid(1).retain(true).prop(Prop::U32(MESSAGE_EXPIRY, 1)),
    )
    .await;
    p.publish_acked(
        &Pub::new("retexp/u", b"long", 1).pid(2).retain(true).prop(Prop::U32(MESSAGE_EXPIRY, 100)),
    )
    .await;
    let got = late_sub_get(&b, true, "retexp/+", "retexpm/end").await;
    assert_eq!(got.len(), 2, "both retained before expiry: {got:?}");
    // Time must pass for the expiry under test.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let got = late_sub_get(&b, true, "retexp/+", "retexpm/end").await;
    let payloads: Vec<Vec<u8>> = got.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(payloads, vec![b"long".to_vec()], "expired retained message delivered");
    let left = got[0].props.u32_of(MESSAGE_EXPIRY).expect("remaining expiry on a retained message");
    assert!(left < 100, "remaining expiry {left}");
}

#[tokio::test]
async fn subscription_identifier_on_retained_delivery() {
    let b = Broker::start().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("sidr-pub")).await;
    p.publish_acked(&Pub::new("sidr/t", b"kept", 1).pid(1).retain(true)).await;
    let (mut c, _) = RawClient::connect_ok(b.addr, &Conn::v5("sidr")).await;
    c.subscribe(1, &[("sidr/#", 1)], &[Prop::VarInt(SUBSCRIPTION_ID, 42)]).await;
    let m = c.recv_pub_auto().await;
    assert!(m.retain);
    assert_eq!(m.props.sub_ids(), vec![42], "retained delivery carries the subscription identifier");
}

#[tokio::test]
async fn shared_subscription_member_leaves() {
    let b = Broker::start().await;
    let (mut stay, _) = RawClient::connect_ok(b.addr, &Conn::v5("sh-stay")).await;
    stay.sub("$share/g2/shl/t", 1).await;
    let (mut leave, _) = RawClient::connect_ok(b.addr, &Conn::v5("sh-leave")).await;
    leave.sub("$share/g2/shl/t", 1).await;
    leave.disconnect().await;
    let (mut p, _) = RawClient::connect_ok(b.addr, &Conn::v5("sh-pub")).await;
    for i in 0..10u16 {
        p.publish_acked(&Pub::new("shl/t", format!("{i}").as_bytes(), 1).pid(i + 1)).await;
    }
    for i in 0..10u16 {
        let m = stay.recv_pub_auto().await;
        assert_eq!(m.payload, format!("{i}").as_bytes(), "the remaining member gets every message");
    }
}
