//! Behaviour of the state machine, one rule per test, plus determinism and
//! snapshot round-trip properties.

use super::pb::command::Cmd;
use super::*;
use bytes::Bytes;
use proptest::prelude::*;

const C1: &str = "c1";
const C2: &str = "c2";

fn cmd(c: Cmd) -> pb::Command {
    pb::Command { cmd: Some(c) }
}

fn open_cmd(client: &str, clean: bool, expiry: u32) -> pb::SessionOpen {
    pb::SessionOpen {
        client_id: client.into(),
        clean_start: clean,
        session_expiry_s: expiry,
        receive_maximum: 0,
        protocol_version: 5,
        will: None,
        connection_id: 0,
    }
}

fn open(client: &str, clean: bool, expiry: u32) -> pb::Command {
    cmd(Cmd::SessionOpen(open_cmd(client, clean, expiry)))
}

fn close(client: &str, publish_will: bool, expiry: Option<u32>) -> pb::Command {
    cmd(Cmd::SessionClose(pb::SessionClose {
        client_id: client.into(),
        session_expiry_s: expiry,
        publish_will,
        connection_id: 0,
    }))
}

fn subscription(filter: &str, qos: u32) -> pb::Subscription {
    pb::Subscription { filter: filter.into(), qos, ..Default::default() }
}

fn sub_with(client: &str, subs: Vec<pb::Subscription>) -> pb::Command {
    cmd(Cmd::Subscribe(pb::Subscribe {
        client_id: client.into(),
        subscriptions: subs,
        queue_retained: false,
    }))
}

fn sub(client: &str, filter: &str, qos: u32) -> pb::Command {
    sub_with(client, vec![subscription(filter, qos)])
}

fn msg(topic: &str, payload: &'static str, qos: u32) -> pb::Message {
    pb::Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload.as_bytes()),
        qos,
        ..Default::default()
    }
}

fn publish_msg(m: pb::Message) -> pb::Command {
    cmd(Cmd::Publish(pb::Publish { message: Some(m), ..Default::default() }))
}

fn publish(topic: &str, payload: &'static str, qos: u32) -> pb::Command {
    publish_msg(msg(topic, payload, qos))
}

fn ack(client: &str, packet_id: u16, kind: pb::AckKind) -> pb::Command {
    cmd(Cmd::Ack(pb::Ack {
        acks: vec![pb::AckEntry {
            client_id: client.into(),
            packet_id: u32::from(packet_id),
            kind: kind as i32,
        }],
    }))
}

fn tick() -> pb::Command {
    cmd(Cmd::Tick(pb::Tick {}))
}

/// Applies `cmds` at `now`; every command must succeed.
fn run(st: &mut State, now: u64, cmds: Vec<pb::Command>) -> Vec<Applied> {
    st.apply_batch(&pb::Batch { now_ms: now, commands: cmds })
        .into_iter()
        .map(|r| r.expect("command failed"))
        .collect()
}

fn run1(st: &mut State, now: u64, c: pb::Command) -> Applied {
    run(st, now, vec![c]).remove(0)
}

fn ids(st: &State, client: &str) -> Vec<u16> {
    st.session(client).map(|s| s.inflight().map(|e| e.packet_id).collect()).unwrap_or_default()
}

fn payloads_inflight(st: &State, client: &str) -> Vec<Bytes> {
    st.session(client)
        .map(|s| s.inflight().map(|e| e.delivery.message.payload.clone()).collect())
        .unwrap_or_default()
}

fn limits() -> Limits {
    Limits { max_queued_messages: 100, max_queued_bytes: 0, max_inflight: 10, queue_qos0_offline: false }
}

fn published(a: &Applied) -> Vec<&pb::Message> {
    a.events
        .iter()
        .filter_map(|e| match e {
            Event::Published { message } => Some(message),
            _ => None,
        })
        .collect()
}

fn ended(a: &Applied) -> Vec<&str> {
    a.events
        .iter()
        .filter_map(|e| match e {
            Event::SessionEnded { client_id } => Some(client_id.as_str()),
            _ => None,
        })
        .collect()
}

fn will(topic: &str, delay_s: u32) -> pb::Will {
    pb::Will { message: Some(msg(topic, "gone", 1)), delay_s, message_expiry_interval_s: None }
}

fn open_with_will(client: &str, w: pb::Will, expiry: u32) -> pb::Command {
    cmd(Cmd::SessionOpen(pb::SessionOpen { will: Some(w), ..open_cmd(client, false, expiry) }))
}

#[test]
fn session_open_resume_and_clean_start() {
    let mut st = State::new(limits());
    let a = run1(&mut st, 1, open(C1, false, 100));
    assert!(!a.session_present);
    run(&mut st, 2, vec![sub(C1, "a", 1), close(C1, false, None)]);
    assert!(!st.session(C1).map(|s| s.online()).unwrap_or(true));
    let a = run1(&mut st, 3, open(C1, false, 100));
    assert!(a.session_present);
    assert_eq!(st.session(C1).map(|s| s.subscriptions().count()), Some(1));
    let a = run1(&mut st, 4, open(C1, true, 100));
    assert!(!a.session_present, "clean start never reports a present session");
    assert_eq!(st.session(C1).map(|s| s.subscriptions().count()), Some(0));
    assert_eq!(st.subscription_count(), 0, "the tree forgot the old subscriptions");
}

#[test]
fn clean_start_discards_inflight_queue_and_subscriptions() {
    let mut st = State::new(Limits { max_inflight: 1, ..limits() });
    run(&mut st, 1, vec![open(C1, false, 100), sub(C1, "t", 1), publish("t", "1", 1), publish("t", "2", 1)]);
    let s = st.session(C1).expect("session");
    assert_eq!((s.inflight_len(), s.queue_len()), (1, 1));
    run(&mut st, 2, vec![close(C1, false, None), open(C1, true, 100), publish("t", "3", 1)]);
    let s = st.session(C1).expect("session");
    assert_eq!((s.inflight_len(), s.queue_len()), (0, 0));
    // Packet ids start over too.
    run(&mut st, 3, vec![sub(C1, "t", 1), publish("t", "4", 1)]);
    assert_eq!(ids(&st, C1), vec![1]);
}

#[test]
fn packet_ids_wrap_and_skip_ids_in_flight() {
    let mut st = State::new(Limits { max_inflight: 0, ..limits() });
    run(&mut st, 1, vec![open(C1, false, 100), sub(C1, "t", 1), publish("t", "a", 1), publish("t", "b", 1)]);
    assert_eq!(ids(&st, C1), vec![1, 2]);
    run1(&mut st, 2, ack(C1, 2, pb::AckKind::Puback));
    st.sessions.get_mut(C1).expect("session").next_packet_id = 65535;
    run(&mut st, 3, vec![publish("t", "c", 1), publish("t", "d", 1), publish("t", "e", 1)]);
    // 65535, then wrap to 1 (in flight: skipped), then 2 (free again), 3.
    assert_eq!(ids(&st, C1), vec![1, 65535, 2, 3]);
    let order: Vec<Bytes> = payloads_inflight(&st, C1);
    assert_eq!(order, vec!["a", "c", "d", "e"], "in-flight order is the delivery order");
    assert_eq!(
        st.session(C1).and_then(|s| s.inflight_get(65535)).map(|e| e.delivery.message.payload.clone()),
        Some(Bytes::from("c"))
    );
}

#[test]
fn window_is_min_of_receive_maximum_and_limit_and_acks_refill_it() {
    let mut st = State::new(Limits { max_inflight: 2, ..limits() });
    let mut o = open_cmd(C1, false, 100);
    o.receive_maximum = 5;
    run(&mut st, 1, vec![cmd(Cmd::SessionOpen(o)), sub(C1, "t", 1)]);
    let r = run(&mut st, 2, (0..4).map(|_| publish("t", "x", 1)).collect());
    assert_eq!(ids(&st, C1), vec![1, 2]);
    assert_eq!(st.session(C1).map(|s| s.queue_len()), Some(2));
    assert!(r[0].events.contains(&Event::Deliver { client_id: C1.into() }));
    assert!(r[2].events.is_empty(), "a queued message wakes nobody");
    let a = run1(&mut st, 3, ack(C1, 1, pb::AckKind::Puback));
    assert_eq!(ids(&st, C1), vec![2, 3]);
    assert_eq!(a.events, vec![Event::Deliver { client_id: C1.into() }]);
    assert_eq!(st.session(C1).map(|s| s.queue_len()), Some(1));

    // The client's Receive Maximum below the server limit wins.
    let mut o = open_cmd(C2, false, 100);
    o.receive_maximum = 1;
    run(
        &mut st,
        4,
        vec![cmd(Cmd::SessionOpen(o)), sub(C2, "u", 2), publish("u", "1", 2), publish("u", "2", 2)],
    );
    assert_eq!(ids(&st, C2), vec![1]);
    assert_eq!(st.session(C2).map(|s| s.queue_len()), Some(1));
}

#[test]
fn resume_with_larger_receive_maximum_fills_the_window() {
    let mut st = State::new(Limits { max_inflight: 0, ..limits() });
    let mut o = open_cmd(C1, false, 100);
    o.receive_maximum = 1;
    run(&mut st, 1, vec![cmd(Cmd::SessionOpen(o.clone())), sub(C1, "t", 1), close(C1, false, None)]);
    run(&mut st, 2, vec![publish("t", "1", 1), publish("t", "2", 1), publish("t", "3", 1)]);
    assert_eq!(ids(&st, C1), vec![1]);
    o.receive_maximum = 3;
    let a = run1(&mut st, 3, cmd(Cmd::SessionOpen(o)));
    assert!(a.session_present);
    assert_eq!(ids(&st, C1), vec![1, 2, 3]);
    assert_eq!(a.events, vec![Event::Deliver { client_id: C1.into() }]);
}

#[test]
fn full_queue_drops_the_newest_and_counts_it() {
    let mut st = State::new(Limits { max_inflight: 1, max_queued_messages: 2, ..limits() });
    run(&mut st, 1, vec![open(C1, false, 100), sub(C1, "t", 1)]);
    run(&mut st, 2, ["1", "2", "3", "4", "5"].iter().map(|p| publish("t", p, 1)).collect());
    let s = st.session(C1).expect("session");
    assert_eq!(s.inflight_len(), 1);
    let q: Vec<Bytes> = s.queue().map(|d| d.message.payload.clone()).collect();
    assert_eq!(q, vec!["2", "3"], "the oldest are kept");
    assert_eq!(s.dropped(), 2);

    // Byte limit: topic (1) + payload.
    let mut st = State::new(Limits { max_inflight: 1, max_queued_bytes: 10, ..limits() });
    run(&mut st, 1, vec![open(C1, false, 100), sub(C1, "t", 1), publish("t", "first", 1)]);
    run(&mut st, 2, vec![publish("t", "1234", 1), publish("t", "1234", 1), publish("t", "1", 1)]);
    let s = st.session(C1).expect("session");
    assert_eq!(s.queue_len(), 2);
    assert_eq!(s.queued_bytes(), 10);
    assert_eq!(s.dropped(), 1);
}

#[test]
fn expired_messages_leave_the_queue_on_tick_and_are_skipped_into_the_window() {
    let mut st = State::new(Limits { max_inflight: 1, ..limits() });
    run(&mut st, 1000, vec![open(C1, false, 100), sub(C1, "t", 1), publish("t", "head", 1)]);
    let short = pb::Message { expires_at_ms: 1500, ..msg("t", "short", 1) };
    let long = pb::Message { expires_at_ms: 9000, ..msg("t", "long", 1) };
    let never = msg("t", "never", 1);
    run(&mut st, 1000, vec![publish_msg(short.clone()), publish_msg(long), publish_msg(never)]);
    assert_eq!(st.session(C1).map(|s| s.queue_len()), Some(3));
    run1(&mut st, 2000, tick());
    let s = st.session(C1).expect("session");
    assert_eq!(s.queue_len(), 2);
    assert_eq!(s.expired(), 1);
    // "long" expires while queued and is skipped when the window opens.
    run1(&mut st, 9500, ack(C1, 1, pb::AckKind::Puback));
    assert_eq!(payloads_inflight(&st, C1), vec!["never"]);
    assert_eq!(st.session(C1).map(|s| s.expired()), Some(2));
    // A message already expired when applied is not routed at all.
    let gone = pb::Message { expires_at_ms: 100, ..msg("t", "late", 1) };
    run1(&mut st, 9600, publish_msg(gone));
    assert_eq!(st.session(C1).map(|s| s.queue_len()), Some(0));
}

#[test]
fn retained_set_replace_clear_and_expire() {
    let mut st = State::new(limits());
    let r = |p: &'static str| pb::Message { retain: true, ..msg("a/b", p, 0) };
    run1(&mut st, 1, publish_msg(r("one")));
    assert_eq!(st.retained("a/b").map(|m| m.payload.clone()), Some(Bytes::from("one")));
    run1(&mut st, 2, publish_msg(r("two")));
    assert_eq!(st.retained("a/b").map(|m| m.payload.clone()), Some(Bytes::from("two")));
    assert_eq!(st.retained_count(), 1);
    run1(&mut st, 3, publish_msg(r("")));
    assert_eq!(st.retained("a/b"), None);
    // A non-retained publish does not touch the store.
    run1(&mut st, 4, publish_msg(r("three")));
    run1(&mut st, 5, publish("a/b", "", 0));
    assert!(st.retained("a/b").is_some());

    let exp = pb::Message { retain: true, expires_at_ms: 1000, ..msg("x", "e", 1) };
    run1(&mut st, 6, publish_msg(exp));
    assert!(st.retained("x").is_some());
    assert!(st.retained_matching("x", 999).len() == 1);
    assert!(st.retained_matching("x", 1000).is_empty(), "expired ones are not returned");
    run1(&mut st, 1000, tick());
    assert_eq!(st.retained("x"), None);
    assert_eq!(st.retained_count(), 1);
}

#[test]
fn replacing_an_expiring_retained_message_forgets_the_old_expiry() {
    let mut st = State::new(limits());
    let r = |p: &'static str, exp| pb::Message { retain: true, expires_at_ms: exp, ..msg("t", p, 0) };
    run1(&mut st, 1, publish_msg(r("old", 1000)));
    run1(&mut st, 2, publish_msg(r("new", 0)));
    run1(&mut st, 5000, tick());
    assert_eq!(st.retained("t").map(|m| m.payload.clone()), Some(Bytes::from("new")));
    run1(&mut st, 5001, publish_msg(r("later", 9000)));
    run1(&mut st, 8999, tick());
    assert!(st.retained("t").is_some());
    run1(&mut st, 9000, tick());
    assert!(st.retained("t").is_none());
}

#[test]
fn subscribe_can_queue_retained_messages_through_the_session() {
    let mut st = State::new(limits());
    for (t, q) in [("r/a", 1), ("r/b", 0), ("r/c", 2)] {
        run1(&mut st, 1, publish_msg(pb::Message { retain: true, ..msg(t, "p", q) }));
    }
    run1(&mut st, 2, open(C1, false, 100));
    let subscribe = |rh: u32, queue_retained: bool| {
        let s = pb::Subscription { retain_handling: rh, subscription_id: 4, ..subscription("r/+", 2) };
        cmd(Cmd::Subscribe(pb::Subscribe { client_id: C1.into(), subscriptions: vec![s], queue_retained }))
    };
    let a = run1(&mut st, 3, subscribe(1, true));
    let q0: Vec<&str> = a.qos0_to_send.iter().map(|d| d.message.topic.as_str()).collect();
    assert_eq!(q0, vec!["r/b"]);
    assert!(a.qos0_to_send.iter().all(|d| d.retain && d.subscription_ids == vec![4]));
    let s = st.session(C1).expect("session");
    let got: Vec<(u16, &str, u8, bool)> = s
        .inflight()
        .map(|e| (e.packet_id, e.delivery.message.topic.as_str(), e.delivery.qos, e.delivery.retain))
        .collect();
    assert_eq!(got, vec![(1, "r/a", 1, true), (2, "r/c", 2, true)]);
    assert!(a.events.contains(&Event::Deliver { client_id: C1.into() }));
    // Retain Handling 1: the subscription exists now, so nothing is sent again.
    let a = run1(&mut st, 4, subscribe(1, true));
    assert!(a.qos0_to_send.is_empty());
    assert_eq!(st.session(C1).map(|s| s.inflight_len()), Some(2));
    // Retain Handling 0 sends again; 2 never; without queue_retained the broker does it.
    assert_eq!(run1(&mut st, 5, subscribe(0, true)).qos0_to_send.len(), 1);
    assert_eq!(st.session(C1).map(|s| s.inflight_len()), Some(4));
    assert!(run1(&mut st, 6, subscribe(2, true)).qos0_to_send.is_empty());
    assert!(run1(&mut st, 7, subscribe(0, false)).qos0_to_send.is_empty());
    assert_eq!(st.session(C1).map(|s| s.inflight_len()), Some(4));
}

#[test]
fn inflight_after_lists_only_new_entries() {
    let mut st = State::new(limits());
    run(&mut st, 1, vec![open(C1, false, 100), sub(C1, "t", 1), publish("t", "a", 1), publish("t", "b", 1)]);
    let s = st.session(C1).expect("session");
    let all: Vec<(u64, u16)> = s.inflight_after(None).map(|(q, e)| (q, e.packet_id)).collect();
    assert_eq!(all.len(), 2);
    let last = all[1].0;
    run1(&mut st, 2, publish("t", "c", 1));
    let s = st.session(C1).expect("session");
    let new: Vec<u16> = s.inflight_after(Some(last)).map(|(_, e)| e.packet_id).collect();
    assert_eq!(new, vec![3]);
}

#[test]
fn retained_matching_filters() {
    let mut st = State::new(limits());
    for t in ["a", "a/b", "a/b/c", "ab", "b/b", "$SYS/x"] {
        run1(&mut st, 1, publish_msg(pb::Message { retain: true, ..msg(t, "p", 0) }));
    }
    let topics =
        |f: &str| -> Vec<String> { st.retained_matching(f, 1).iter().map(|m| m.topic.clone()).collect() };
    assert_eq!(topics("a"), vec!["a"]);
    assert_eq!(topics("a/#"), vec!["a", "a/b", "a/b/c"]);
    assert_eq!(topics("a/+"), vec!["a/b"]);
    assert_eq!(topics("+/b"), vec!["a/b", "b/b"]);
    assert_eq!(topics("#"), vec!["a", "a/b", "a/b/c", "ab", "b/b"]);
    assert_eq!(topics("$SYS/#"), vec!["$SYS/x"]);
    assert_eq!(topics("$share/g/#"), Vec::<String>::new());
}

#[test]
fn sessions_expire_on_tick() {
    let mut st = State::new(limits());
    run(&mut st, 1000, vec![open(C1, false, 10), open(C2, false, EXPIRY_NEVER), open("c3", false, 10)]);
    run(&mut st, 1000, vec![close(C1, false, None), close(C2, false, None)]);
    let a = run1(&mut st, 10_999, tick());
    assert!(ended(&a).is_empty());
    let a = run1(&mut st, 11_000, tick());
    assert_eq!(ended(&a), vec![C1]);
    assert!(st.session(C1).is_none());
    // Never-expiring and online sessions stay.
    run1(&mut st, u64::MAX / 2, tick());
    assert!(st.session(C2).is_some());
    assert!(st.session("c3").is_some());
    // Expiry 0 (also set by DISCONNECT) ends the session at close.
    let a = run1(&mut st, u64::MAX / 2, close("c3", false, Some(0)));
    assert_eq!(ended(&a), vec!["c3"]);
    assert!(st.session("c3").is_none());
}

#[test]
fn delayed_will_fires_on_tick() {
    let mut st = State::new(limits());
    run(&mut st, 0, vec![open(C2, false, 100), sub(C2, "will/#", 1)]);
    run1(&mut st, 1000, open_with_will(C1, will("will/c1", 5), 100));
    let a = run1(&mut st, 1000, close(C1, true, None));
    assert!(published(&a).is_empty());
    assert_eq!(st.session(C1).and_then(|s| s.will_due_at_ms()), Some(6000));
    assert!(published(&run1(&mut st, 5999, tick())).is_empty());
    let a = run1(&mut st, 6000, tick());
    assert_eq!(published(&a).iter().map(|m| m.topic.as_str()).collect::<Vec<_>>(), vec!["will/c1"]);
    assert_eq!(payloads_inflight(&st, C2), vec!["gone"], "the will reached the persistent subscriber");
    assert!(st.session(C1).and_then(|s| s.will()).is_none());
    assert!(published(&run1(&mut st, 7000, tick())).is_empty(), "a will fires once");
}

#[test]
fn resuming_before_the_delay_cancels_the_will() {
    let mut st = State::new(limits());
    run1(&mut st, 1000, open_with_will(C1, will("w", 5), 100));
    run1(&mut st, 1000, close(C1, true, None));
    let a = run1(&mut st, 3000, open(C1, false, 100));
    assert!(a.session_present);
    assert!(published(&run1(&mut st, 10_000, tick())).is_empty());
}

#[test]
fn session_ending_first_fires_the_will_then() {
    let mut st = State::new(limits());
    run1(&mut st, 1000, open_with_will(C1, will("w", 60), 2));
    run1(&mut st, 1000, close(C1, true, None));
    let a = run1(&mut st, 3000, tick());
    assert_eq!(published(&a).len(), 1);
    assert_eq!(ended(&a), vec![C1]);
    // Ending by SessionRemove fires it too.
    run1(&mut st, 4000, open_with_will(C2, will("w", 60), 100));
    run1(&mut st, 4000, close(C2, true, None));
    let a = run1(&mut st, 4001, cmd(Cmd::SessionRemove(pb::SessionRemove { client_id: C2.into() })));
    assert_eq!(published(&a).len(), 1);
    assert_eq!(ended(&a), vec![C2]);
}

#[test]
fn will_without_delay_fires_at_close_and_normal_close_deletes_it() {
    let mut st = State::new(limits());
    let mut w = will("w/x", 0);
    w.message = w.message.map(|m| pb::Message { retain: true, ..m });
    w.message_expiry_interval_s = Some(30);
    run1(&mut st, 1000, open_with_will(C1, w, 100));
    let a = run1(&mut st, 2000, close(C1, true, None));
    let p = published(&a);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].expires_at_ms, 32_000, "will expiry counts from publication");
    assert_eq!(st.retained("w/x").map(|m| m.payload.clone()), Some(Bytes::from("gone")));

    run1(&mut st, 3000, open_with_will(C2, will("w/y", 0), 100));
    let a = run1(&mut st, 3000, close(C2, false, None));
    assert!(published(&a).is_empty());
    assert!(st.session(C2).and_then(|s| s.will()).is_none());
    // With expiry 0 and a delay, the session ends now, so the will goes now.
    run1(&mut st, 4000, open_with_will("c3", will("w/z", 100), 0));
    let a = run1(&mut st, 4000, close("c3", true, None));
    assert_eq!(published(&a).len(), 1);
    assert_eq!(ended(&a), vec!["c3"]);
}

#[test]
fn overlapping_subscriptions_give_one_copy_at_max_qos_with_all_ids() {
    let mut st = State::new(limits());
    let s = |f: &str, qos, id| pb::Subscription { subscription_id: id, ..subscription(f, qos) };
    run(
        &mut st,
        1,
        vec![open(C1, false, 100), sub_with(C1, vec![s("a/+", 1, 1), s("a/#", 2, 2), s("a/b", 0, 0)])],
    );
    run1(&mut st, 2, publish("a/b", "x", 2));
    let s = st.session(C1).expect("session");
    assert_eq!(s.inflight_len(), 1);
    let e = s.inflight().next().expect("entry");
    assert_eq!(e.delivery.qos, 2);
    assert_eq!(e.delivery.subscription_ids, vec![1, 2]);
    // Effective QoS is capped by the message's QoS.
    run1(&mut st, 3, publish("a/c", "y", 1));
    let s = st.session(C1).expect("session");
    assert_eq!(s.inflight().map(|e| e.delivery.qos).collect::<Vec<_>>(), vec![2, 1]);
}

#[test]
fn no_local_skips_the_publisher() {
    let mut st = State::new(limits());
    let nl = pb::Subscription { no_local: true, ..subscription("t", 1) };
    run(
        &mut st,
        1,
        vec![open(C1, false, 100), sub_with(C1, vec![nl]), open(C2, false, 100), sub(C2, "t", 1)],
    );
    let p = |from: &str| {
        cmd(Cmd::Publish(pb::Publish {
            message: Some(msg("t", "x", 1)),
            publisher_client_id: from.into(),
            ..Default::default()
        }))
    };
    run1(&mut st, 2, p(C1));
    assert_eq!(ids(&st, C1), Vec::<u16>::new());
    assert_eq!(ids(&st, C2), vec![1]);
    run1(&mut st, 3, p(C2));
    assert_eq!(ids(&st, C1), vec![1]);
    assert_eq!(ids(&st, C2), vec![1, 2], "no_local off: the publisher gets its own message");
}

#[test]
fn retain_flag_on_delivery_follows_retain_as_published() {
    let mut st = State::new(limits());
    let rap = pb::Subscription { retain_as_published: true, ..subscription("t", 1) };
    run(
        &mut st,
        1,
        vec![open(C1, false, 100), sub_with(C1, vec![rap]), open(C2, false, 100), sub(C2, "t", 1)],
    );
    run1(&mut st, 2, publish_msg(pb::Message { retain: true, ..msg("t", "x", 1) }));
    let flag = |c| st.session(c).and_then(|s| s.inflight().next().map(|e| e.delivery.retain));
    assert_eq!(flag(C1), Some(true));
    assert_eq!(flag(C2), Some(false));
}

#[test]
fn incoming_qos2_duplicates_are_not_routed_again() {
    let mut st = State::new(limits());
    run(&mut st, 1, vec![open(C1, false, 100), open(C2, false, 100), sub(C2, "t", 2)]);
    let p = cmd(Cmd::Publish(pb::Publish {
        message: Some(msg("t", "x", 2)),
        publisher_client_id: C1.into(),
        incoming_qos2_packet_id: Some(7),
        ..Default::default()
    }));
    assert!(!run1(&mut st, 2, p.clone()).duplicate);
    assert!(st.session(C1).is_some_and(|s| s.has_incoming_qos2(7)));
    assert!(run1(&mut st, 3, p.clone()).duplicate);
    assert_eq!(ids(&st, C2), vec![1]);
    let rel = |id| cmd(Cmd::Release(pb::Release { client_id: C1.into(), packet_id: id }));
    assert_eq!(run1(&mut st, 4, rel(7)).existed, vec![true]);
    assert_eq!(run1(&mut st, 5, rel(7)).existed, vec![false]);
    assert!(!run1(&mut st, 6, p).duplicate, "after PUBREL the id is free again");
    assert_eq!(ids(&st, C2), vec![1, 2]);
    // The id must be a valid packet id.
    let bad = cmd(Cmd::Release(pb::Release { client_id: C1.into(), packet_id: 0 }));
    assert_eq!(st.apply_command(&bad), Err(StateError::InvalidPacketId(0)));
}

#[test]
fn outgoing_qos2_pubrec_then_pubcomp() {
    let mut st = State::new(limits());
    run(&mut st, 1, vec![open(C1, false, 100), sub(C1, "t", 2), publish("t", "x", 2)]);
    run1(&mut st, 2, ack(C1, 1, pb::AckKind::Puback));
    assert_eq!(ids(&st, C1), vec![1], "PUBACK does not complete a QoS 2 message");
    run1(&mut st, 3, ack(C1, 1, pb::AckKind::Pubrec));
    assert!(st.session(C1).and_then(|s| s.inflight_get(1)).is_some_and(|e| e.awaiting_pubcomp));
    run1(&mut st, 4, ack(C1, 1, pb::AckKind::Pubcomp));
    assert_eq!(ids(&st, C1), Vec::<u16>::new());
    // Acks for unknown sessions or ids are ignored (they are batched lazily).
    run1(&mut st, 5, ack("nobody", 1, pb::AckKind::Puback));
    run1(&mut st, 5, ack(C1, 99, pb::AckKind::Pubcomp));
}

#[test]
fn qos0_is_queued_only_offline_and_only_when_enabled() {
    let mut st = State::new(Limits { queue_qos0_offline: true, ..limits() });
    run(&mut st, 1, vec![open(C1, false, 100), sub(C1, "t", 1)]);
    run1(&mut st, 2, publish("t", "online", 0));
    assert_eq!(st.session(C1).map(|s| s.queue_len()), Some(0), "online: the fast path delivers QoS 0");
    run(&mut st, 3, vec![close(C1, false, None), publish("t", "q0", 0), publish("t", "q1", 1)]);
    assert_eq!(st.session(C1).map(|s| s.queue_len()), Some(1));
    assert_eq!(ids(&st, C1), vec![1]);
    let a = run1(&mut st, 4, open(C1, false, 100));
    assert_eq!(a.qos0_to_send.iter().map(|d| d.message.payload.clone()).collect::<Vec<_>>(), vec!["q0"]);
    assert_eq!(a.qos0_to_send[0].qos, 0);
    assert_eq!(st.session(C1).map(|s| (s.queue_len(), s.queued_bytes())), Some((0, 0)));

    let mut st = State::new(limits());
    run(
        &mut st,
        1,
        vec![open(C1, false, 100), sub(C1, "t", 1), close(C1, false, None), publish("t", "q0", 0)],
    );
    assert_eq!(st.session(C1).map(|s| s.queue_len()), Some(0));
}

#[test]
fn shared_targets_get_a_copy_with_their_shared_subscription_options() {
    let mut st = State::new(limits());
    let sh = pb::Subscription { subscription_id: 9, ..subscription("$share/g/a/+", 1) };
    run(&mut st, 1, vec![open(C1, false, 100), sub_with(C1, vec![sh])]);
    assert_eq!(st.subscription_count(), 0, "shared subscriptions are not in the tree");
    run1(&mut st, 2, publish("a/b", "x", 2));
    assert_eq!(ids(&st, C1), Vec::<u16>::new(), "only the broker's pick gets shared messages");
    let p = |filter: &str| {
        cmd(Cmd::Publish(pb::Publish {
            message: Some(msg("a/b", "x", 2)),
            shared_targets: vec![pb::SharedTarget { client_id: C1.into(), filter: filter.into() }],
            ..Default::default()
        }))
    };
    run1(&mut st, 3, p(""));
    let e = st.session(C1).and_then(|s| s.inflight().next().cloned()).expect("delivered");
    assert_eq!((e.delivery.qos, e.delivery.subscription_ids), (1, vec![9]));
    run1(&mut st, 4, p("$share/g/a/+"));
    run1(&mut st, 5, p("$share/other/a/+"));
    assert_eq!(ids(&st, C1), vec![1, 2]);
}

#[test]
fn errors_are_per_command_and_change_nothing() {
    let mut st = State::new(limits());
    run1(&mut st, 1, open(C1, false, 100));
    let before = st.digest();
    let r = st.apply_batch(&pb::Batch {
        now_ms: 1,
        commands: vec![
            sub("nobody", "a", 0),
            sub_with(C1, vec![subscription("ok", 0), subscription("bad/#/x", 0)]),
            sub(C1, "q", 3),
            publish("bad/+", "x", 0),
            pb::Command { cmd: None },
            cmd(Cmd::SessionClose(pb::SessionClose { client_id: "nobody".into(), ..Default::default() })),
            sub(C1, "good", 1),
        ],
    });
    assert_eq!(r[0], Err(StateError::UnknownSession("nobody".into())));
    assert_eq!(r[1], Err(StateError::InvalidFilter("bad/#/x".into())));
    assert_eq!(r[2], Err(StateError::InvalidQos(3)));
    assert_eq!(r[3], Err(StateError::InvalidTopic("bad/+".into())));
    assert_eq!(r[4], Err(StateError::EmptyCommand));
    assert_eq!(r[5], Err(StateError::UnknownSession("nobody".into())));
    assert_eq!(r[6].as_ref().map(|a| a.existed.clone()), Ok(vec![false]));
    assert_eq!(st.session(C1).map(|s| s.subscriptions().count()), Some(1), "'ok' was not half-applied");
    assert_ne!(st.digest(), before);
}

#[test]
fn subscribe_and_unsubscribe_report_existence() {
    let mut st = State::new(limits());
    run1(&mut st, 1, open(C1, false, 100));
    assert_eq!(run1(&mut st, 2, sub(C1, "a", 0)).existed, vec![false]);
    assert_eq!(run1(&mut st, 3, sub(C1, "a", 1)).existed, vec![true]);
    assert_eq!(st.session(C1).and_then(|s| s.subscription("a")).map(|s| s.qos), Some(1));
    let un =
        |f: &str| cmd(Cmd::Unsubscribe(pb::Unsubscribe { client_id: C1.into(), filters: vec![f.into()] }));
    assert_eq!(run1(&mut st, 4, un("a")).existed, vec![true]);
    assert_eq!(run1(&mut st, 5, un("a")).existed, vec![false]);
    run1(&mut st, 6, publish("a", "x", 1));
    assert_eq!(ids(&st, C1), Vec::<u16>::new());
}

#[test]
fn stale_close_after_takeover_is_ignored() {
    let mut st = State::new(limits());
    let o = |conn| cmd(Cmd::SessionOpen(pb::SessionOpen { connection_id: conn, ..open_cmd(C1, false, 100) }));
    let c = |conn| {
        cmd(Cmd::SessionClose(pb::SessionClose {
            client_id: C1.into(),
            connection_id: conn,
            ..Default::default()
        }))
    };
    run(&mut st, 1, vec![o(1), o(2), c(1)]);
    assert!(st.session(C1).is_some_and(|s| s.online()));
    run1(&mut st, 2, c(2));
    assert!(st.session(C1).is_some_and(|s| !s.online()));
}

#[test]
fn reset_connections_takes_every_session_offline() {
    let mut st = State::new(limits());
    run(&mut st, 1000, vec![open_with_will(C1, will("w1", 0), 100), open_with_will(C2, will("w2", 0), 0)]);
    run(&mut st, 1000, vec![open("c3", false, 100), close("c3", false, None)]);
    let a = run1(&mut st, 2000, cmd(Cmd::ResetConnections(pb::ResetConnections { publish_wills: true })));
    let mut topics: Vec<&str> = published(&a).iter().map(|m| m.topic.as_str()).collect();
    topics.sort();
    assert_eq!(topics, vec!["w1", "w2"]);
    assert_eq!(ended(&a), vec![C2], "expiry 0 ends the session");
    let s = st.session(C1).expect("kept");
    assert!(!s.online());
    assert_eq!(s.disconnected_at_ms(), 2000);
    assert_eq!(st.session("c3").map(|s| s.disconnected_at_ms()), Some(1000), "offline ones untouched");
}

#[test]
fn time_never_goes_back() {
    let mut st = State::new(limits());
    run1(&mut st, 5000, open(C1, false, 1));
    run1(&mut st, 5000, close(C1, false, None));
    // A proposer with a slow clock: still 5000, the session must not expire.
    run1(&mut st, 100, tick());
    assert_eq!(st.now_ms(), 5000);
    assert!(st.session(C1).is_some());
}

#[test]
fn snapshot_restore_rejects_invalid_input() {
    let mut st = State::new(limits());
    run(&mut st, 1, vec![open(C1, false, 100), sub(C1, "t", 1), publish("t", "x", 1)]);
    let good = st.snapshot();
    assert!(State::from_snapshot(good.clone(), limits()).is_ok());

    let mut bad = good.clone();
    bad.format_version = 99;
    assert!(matches!(State::from_snapshot(bad, limits()), Err(StateError::InvalidSnapshot(_))));
    let mut bad = good.clone();
    bad.sessions.push(good.sessions[0].clone());
    assert!(matches!(State::from_snapshot(bad, limits()), Err(StateError::InvalidSnapshot(_))));
    let mut bad = good.clone();
    let e = bad.sessions[0].inflight[0].clone();
    bad.sessions[0].inflight.push(e);
    assert!(matches!(State::from_snapshot(bad, limits()), Err(StateError::InvalidSnapshot(_))));
    let mut bad = good.clone();
    bad.sessions[0].subscriptions[0].filter = "a/#/b".into();
    assert!(matches!(State::from_snapshot(bad, limits()), Err(StateError::InvalidFilter(_))));
    let mut bad = good;
    bad.sessions[0].next_packet_id = 0;
    assert!(matches!(State::from_snapshot(bad, limits()), Err(StateError::InvalidPacketId(0))));
    assert!(matches!(State::from_snapshot_bytes(&[0xff, 0xff], limits()), Err(StateError::Decode(_))));
}

#[test]
fn restored_state_routes_through_the_rebuilt_tree() {
    let mut st = State::new(limits());
    run(&mut st, 1, vec![open(C1, false, 100), sub(C1, "a/#", 1), close(C1, false, None)]);
    let mut r = State::from_snapshot_bytes(&st.snapshot_bytes(), limits()).expect("restore");
    run1(&mut r, 2, publish("a/b", "x", 1));
    assert_eq!(ids(&r, C1), vec![1]);
    assert_eq!(r.subscription_count(), 1);
}

#[test]
fn pin_leader_is_recorded_kept_by_snapshots_and_cleared() {
    let mut st = State::new(limits());
    assert_eq!(st.cluster_settings().pinned_leader, None);
    assert_eq!(st.cluster_settings().mode(), pb::Mode::FullSync);
    run1(&mut st, 1, cmd(Cmd::PinLeader(pb::PinLeader { node_id: Some(3) })));
    assert_eq!(st.cluster_settings().pinned_leader, Some(3));
    let r = State::from_snapshot_bytes(&st.snapshot_bytes(), limits()).expect("restore");
    assert_eq!(r.cluster_settings().pinned_leader, Some(3));
    assert_eq!(r.digest(), st.digest());

    // Node id 0 does not exist: an error, and nothing changes.
    let res = st.apply_batch(&pb::Batch {
        now_ms: 2,
        commands: vec![cmd(Cmd::PinLeader(pb::PinLeader { node_id: Some(0) }))],
    });
    assert!(matches!(res[0], Err(StateError::InvalidNodeId(0))));
    assert_eq!(st.cluster_settings().pinned_leader, Some(3));

    run1(&mut st, 3, cmd(Cmd::PinLeader(pb::PinLeader { node_id: None })));
    assert_eq!(st.cluster_settings().pinned_leader, None);

    // A snapshot of an older version (no cluster settings) restores the defaults;
    // invalid settings are refused.
    let mut old = st.snapshot();
    old.cluster = None;
    let r = State::from_snapshot(old, limits()).expect("restore");
    assert_eq!(r.cluster_settings(), &pb::ClusterSettings::default());
    let mut bad = st.snapshot();
    bad.cluster = Some(pb::ClusterSettings { pinned_leader: Some(0), mode: 0, ..Default::default() });
    assert!(State::from_snapshot(bad, limits()).is_err());
    let mut bad = st.snapshot();
    bad.cluster = Some(pb::ClusterSettings { pinned_leader: None, mode: 7, ..Default::default() });
    assert!(matches!(State::from_snapshot(bad, limits()), Err(StateError::InvalidSnapshot(_))));
}

// ------------------------------------------------------------ properties

/// The snapshot as `State::snapshot` built it before the collections were
/// shared: the reference a view's encoding must equal byte for byte.
fn reference_snapshot(st: &State) -> pb::Snapshot {
    pb::Snapshot {
        format_version: SNAPSHOT_FORMAT_VERSION,
        now_ms: st.now_ms,
        sessions: st.sessions().map(|(_, s)| s.to_pb()).collect(),
        retained: st
            .retained
            .values()
            .map(|r| pb::RetainedMessage { message: Some((*r.message).clone()), set_at_ms: r.set_at_ms })
            .collect(),
        cluster: Some(st.cluster.clone()),
        dynsec: st.dynsec().map(|d| d.to_proto()),
    }
}

#[test]
fn a_captured_view_does_not_change_when_the_state_does() {
    use crate::dynsec::{Dynsec, PasswordHash};
    let mut st = State::new(limits());
    st.dynsec.store(Some(Arc::new(Dynsec::initial("admin", PasswordHash::with_salt(b"pw", b"salt", 2)))));
    let mut cmds = Vec::new();
    for i in 0..300 {
        let c = format!("c{i:03}");
        cmds.push(open(&c, false, 100));
        cmds.push(sub(&c, "t/#", 1));
    }
    for i in 0..200 {
        cmds.push(publish_msg(pb::Message { retain: true, ..msg(&format!("r/{i:03}"), "kept", 0) }));
    }
    cmds.push(publish("t/x", "one", 1));
    run(&mut st, 10, cmds);
    let view = st.capture();
    let before = st.snapshot_bytes();
    assert_eq!(view.encode_to_vec(), reference_snapshot(&st).encode_to_vec(), "same bytes as before sharing");
    assert_eq!(view.to_pb().encode_to_vec(), view.encode_to_vec());
    assert_eq!(before, view.encode_to_vec());
    assert_eq!((view.session_count(), view.retained_count(), view.subscription_count()), (300, 200, 300));

    // Change every kind of thing the view holds: sessions (new, changed,
    // removed), their queues and windows, retained messages, the clock, the
    // cluster settings and dynamic security.
    let mut later =
        vec![open("new", false, 100), publish("t/x", "two", 1), ack("c000", 1, pb::AckKind::Puback)];
    later.push(cmd(Cmd::SessionRemove(pb::SessionRemove { client_id: "c001".into() })));
    later.push(publish_msg(pb::Message { retain: true, ..msg("r/000", "", 0) }));
    later.push(publish_msg(pb::Message { retain: true, ..msg("r/001", "replaced", 0) }));
    later.push(cmd(Cmd::PinLeader(pb::PinLeader { node_id: Some(2) })));
    run(&mut st, 20, later);
    st.dynsec.store(None);
    assert_ne!(st.snapshot_bytes(), before);
    assert_eq!(view.encode_to_vec(), before, "the view is frozen");
    assert_eq!(view.now_ms(), 10);
    assert_eq!(view.sessions().find(|s| s.client_id() == "c000").map(|s| s.inflight_len()), Some(1));
    assert!(view.sessions().any(|s| s.client_id() == "c001"));

    // The State itself is what it would be had no view ever been taken.
    let restored = State::from_snapshot_bytes(&st.snapshot_bytes(), limits()).expect("restore");
    assert_eq!(restored.snapshot_bytes(), st.snapshot_bytes());
    assert_eq!(st.session("c000").map(|s| s.inflight_len()), Some(1));
    assert!(st.session("c001").is_none());
    assert_eq!(st.retained("r/001").map(|m| m.payload.clone()), Some(Bytes::from("replaced")));
    assert!(st.retained("r/000").is_none());
}

#[test]
fn an_empty_state_encodes_like_the_protobuf() {
    let st = State::new(limits());
    assert_eq!(st.capture().encode_to_vec(), reference_snapshot(&st).encode_to_vec());
}

fn arb_command() -> impl Strategy<Value = pb::Command> {
    let client = prop::sample::select(vec!["c1", "c2", "c3"]);
    let topic = prop::sample::select(vec!["a", "a/b", "b", "w"]);
    let filter = prop::sample::select(vec!["a", "a/+", "#", "b", "$share/g/a/#"]);
    let payload = prop::sample::select(vec!["", "p", "payload"]);
    prop_oneof![
        2 => (
            client.clone(),
            prop::bool::weighted(0.2),
            prop::sample::select(vec![0u32, 1, 5, 100, EXPIRY_NEVER]),
            0u32..4,
            any::<bool>()
        )
            .prop_map(|(c, clean, exp, rm, with_will)| {
                let will = with_will.then(|| pb::Will {
                    message: Some(pb::Message { retain: true, ..msg("w", "bye", 1) }),
                    delay_s: rm,
                    message_expiry_interval_s: Some(3),
                });
                cmd(Cmd::SessionOpen(pb::SessionOpen {
                    receive_maximum: rm,
                    will,
                    ..open_cmd(c, clean, exp)
                }))
            }),
        1 => (client.clone(), any::<bool>(), prop::option::weighted(0.3, prop::sample::select(vec![0u32, 2, 100])))
            .prop_map(|(c, w, e)| close(c, w, e)),
        3 => (client.clone(), filter.clone(), 0u32..3, 0u32..3, any::<bool>(), 0u32..3, any::<bool>()).prop_map(
            |(c, f, q, id, rap, rh, queue_retained)| {
                let s = pb::Subscription {
                    subscription_id: id,
                    retain_as_published: rap,
                    retain_handling: rh,
                    ..subscription(f, q)
                };
                cmd(Cmd::Subscribe(pb::Subscribe {
                    client_id: c.into(),
                    subscriptions: vec![s],
                    queue_retained,
                }))
            }
        ),
        1 => (client.clone(), filter).prop_map(|(c, f)| {
            cmd(Cmd::Unsubscribe(pb::Unsubscribe { client_id: c.into(), filters: vec![f.into()] }))
        }),
        8 => (
            topic,
            payload,
            0u32..3,
            prop::bool::weighted(0.2),
            prop::option::weighted(0.3, 0u64..20_000),
            client.clone(),
            prop::option::weighted(0.3, 1u32..4),
            prop::option::weighted(0.3, client.clone()),
        )
            .prop_map(|(t, p, q, retain, exp, from, qos2, shared)| {
                cmd(Cmd::Publish(pb::Publish {
                    message: Some(pb::Message { retain, expires_at_ms: exp.unwrap_or(0), ..msg(t, p, q) }),
                    publisher_client_id: from.into(),
                    shared_targets: shared
                        .map(|c| pb::SharedTarget { client_id: c.into(), filter: String::new() })
                        .into_iter()
                        .collect(),
                    incoming_qos2_packet_id: qos2,
                }))
            }),
        4 => (client.clone(), 1u32..8, 1i32..4).prop_map(|(c, id, k)| {
            cmd(Cmd::Ack(pb::Ack {
                acks: vec![pb::AckEntry { client_id: c.into(), packet_id: id, kind: k }],
            }))
        }),
        1 => (client.clone(), 1u32..4)
            .prop_map(|(c, id)| cmd(Cmd::Release(pb::Release { client_id: c.into(), packet_id: id }))),
        1 => Just(tick()),
        1 => any::<bool>().prop_map(|w| cmd(Cmd::ResetConnections(pb::ResetConnections { publish_wills: w }))),
        1 => prop::option::of(0u64..4).prop_map(|n| cmd(Cmd::PinLeader(pb::PinLeader { node_id: n }))),
    ]
}

fn arb_batches() -> impl Strategy<Value = Vec<pb::Batch>> {
    prop::collection::vec((0u64..2000, prop::collection::vec(arb_command(), 1..8)), 1..30).prop_map(|bs| {
        // Start with every client's session open, so most commands hit one.
        let first = pb::Batch {
            now_ms: 0,
            commands: vec![open("c1", false, 100), open("c2", false, 100), open("c3", false, 100)],
        };
        let mut now = 0;
        std::iter::once(first)
            .chain(bs.into_iter().map(|(dt, commands)| {
                now += dt;
                pb::Batch { now_ms: now, commands }
            }))
            .collect()
    })
}

fn small_limits() -> Limits {
    Limits { max_queued_messages: 3, max_queued_bytes: 40, max_inflight: 2, queue_qos0_offline: true }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn same_batches_give_identical_state(batches in arb_batches()) {
        let mut a = State::new(small_limits());
        let mut b = State::new(small_limits());
        for batch in &batches {
            let ra = a.apply_batch(batch);
            let rb = b.apply_batch(batch);
            prop_assert_eq!(ra, rb);
        }
        prop_assert_eq!(a.snapshot_bytes(), b.snapshot_bytes());
        prop_assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn views_are_frozen_and_encode_like_the_protobuf(
        batches in arb_batches(),
        split in any::<prop::sample::Index>(),
    ) {
        let cut = split.index(batches.len() + 1);
        let mut with_view = State::new(small_limits());
        let mut without = State::new(small_limits());
        for batch in &batches[..cut] {
            with_view.apply_batch(batch);
            without.apply_batch(batch);
        }
        let view = with_view.capture();
        let at_capture = reference_snapshot(&with_view).encode_to_vec();
        prop_assert_eq!(&view.encode_to_vec(), &at_capture);
        prop_assert_eq!(&view.to_pb().encode_to_vec(), &at_capture);
        for batch in &batches[cut..] {
            prop_assert_eq!(with_view.apply_batch(batch), without.apply_batch(batch));
        }
        prop_assert_eq!(&view.encode_to_vec(), &at_capture);
        prop_assert_eq!(with_view.snapshot_bytes(), reference_snapshot(&without).encode_to_vec());
    }

    #[test]
    fn snapshot_round_trip_and_continue(batches in arb_batches(), split in any::<prop::sample::Index>()) {
        let cut = split.index(batches.len() + 1);
        let mut orig = State::new(small_limits());
        for batch in &batches[..cut] {
            orig.apply_batch(batch);
        }
        let bytes = orig.snapshot_bytes();
        let mut restored = State::from_snapshot_bytes(&bytes, small_limits()).expect("restore");
        prop_assert_eq!(&restored.snapshot_bytes(), &bytes);
        for batch in &batches[cut..] {
            let ro = orig.apply_batch(batch);
            let rr = restored.apply_batch(batch);
            prop_assert_eq!(ro, rr);
        }
        prop_assert_eq!(orig.digest(), restored.digest());
        // Invariants that every State keeps.
        for (_, s) in orig.sessions() {
            // Something waits in the queue only while the window is full (a
            // resume with a smaller Receive Maximum may leave it over-full).
            if s.queued_qos12 > 0 {
                prop_assert!(s.inflight_len() >= s.window(small_limits().max_inflight));
            }
            prop_assert!(s.queue_len() <= 3);
            prop_assert!(s.queued_bytes() <= 40);
            prop_assert_eq!(s.queued_bytes(), s.queue().map(Delivery::size).sum::<usize>());
            prop_assert_eq!(s.queued_qos12, s.queue().filter(|d| d.qos > 0).count());
            prop_assert!(s.inflight().all(|e| e.packet_id != 0 && e.delivery.qos > 0));
        }
    }
}
