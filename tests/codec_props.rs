//! Property tests of the MQTT codec (`raftmq::protocol`):
//! - every valid packet of both versions round-trips: decode(encode(p)) == p and
//!   encoded_len(p) == the encoded size;
//! - a stream of packets cut at arbitrary points decodes to the same packets;
//! - garbage (random bytes, or mutated valid packets) never panics, and what
//!   decodes re-encodes to the same packet;
//! - decoding never keeps more heap alive than max_packet_size (measured with a
//!   counting global allocator, per thread).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use raftmq::protocol::*;

// ------------------------------------------------------------ allocation meter

/// Counts live heap bytes of the current thread while tracking is on.
struct Meter;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // try_with: the allocator may run while thread-locals are being torn down.
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            LIVE.with(|l| {
                let v = l.get() + delta;
                l.set(v);
                PEAK.with(|p| p.set(p.get().max(v)));
            });
        }
    });
}

unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static METER: Meter = Meter;

/// Runs `f` and returns its result with the peak of heap bytes it kept alive.
fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, isize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    TRACKING.with(|t| t.set(true));
    let r = f();
    TRACKING.with(|t| t.set(false));
    (r, PEAK.with(|p| p.get()))
}

// ------------------------------------------------------------ strategies

const VBI_MAX: u32 = 268_435_455;

fn codes(valid: fn(u8) -> bool) -> Vec<u8> {
    (0..=255u8).filter(|&c| valid(c)).collect()
}

fn v5_codes(t: PacketType) -> Vec<u8> {
    match t {
        PacketType::ConnAck => codes(reason::valid_connack),
        PacketType::PubAck | PacketType::PubRec => codes(reason::valid_puback),
        PacketType::PubRel | PacketType::PubComp => codes(reason::valid_pubrel),
        PacketType::SubAck => codes(reason::valid_suback),
        PacketType::UnsubAck => codes(reason::valid_unsuback),
        PacketType::Disconnect => codes(reason::valid_disconnect),
        _ => codes(reason::valid_auth),
    }
}

/// A well-formed MQTT string: any Unicode scalar but U+0000.
fn string() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

fn topic() -> impl Strategy<Value = String> {
    "[^\u{0}+#]{1,12}"
}

fn opt_topic() -> impl Strategy<Value = Option<String>> {
    option::of("[^\u{0}+#]{0,12}")
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn user() -> impl Strategy<Value = Vec<UserProperty>> {
    vec((string(), string()), 0..3)
}

fn qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn flag() -> impl Strategy<Value = Option<bool>> {
    option::of(any::<bool>())
}

fn format() -> impl Strategy<Value = Option<u8>> {
    option::of(0..=1u8)
}

/// Authentication method and data; data only with a method.
fn auth_pair() -> impl Strategy<Value = (Option<String>, Option<Bytes>)> {
    option::of((string(), option::of(binary()))).prop_map(|o| match o {
        Some((m, d)) => (Some(m), d),
        None => (None, None),
    })
}

fn connect(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v.is_v5();
    let will_props = (
        option::of(any::<u32>()),
        format(),
        option::of(any::<u32>()),
        option::of(string()),
        opt_topic(),
        option::of(binary()),
        user(),
    )
        .prop_map(move |(d, f, e, ct, rt, cd, u)| {
            if !v5 {
                return WillProperties::default();
            }
            WillProperties {
                will_delay_interval: d,
                payload_format_indicator: f,
                message_expiry_interval: e,
                content_type: ct,
                response_topic: rt,
                correlation_data: cd,
                user_properties: u,
            }
        });
    let will = option::of((topic(), binary(), qos(), any::<bool>(), will_props)).prop_map(|w| {
        w.map(|(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties,
        })
    });
    let props = (
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        option::of(1..=u32::MAX),
        option::of(any::<u16>()),
        flag(),
        flag(),
        user(),
        auth_pair(),
    )
        .prop_map(move |(se, rm, mps, tam, rri, rpi, u, (am, ad))| {
            if !v5 {
                return ConnectProperties::default();
            }
            ConnectProperties {
                session_expiry_interval: se,
                receive_maximum: rm,
                maximum_packet_size: mps,
                topic_alias_maximum: tam,
                request_response_information: rri,
                request_problem_information: rpi,
                user_properties: u,
                authentication_method: am,
                authentication_data: ad,
            }
        });
    (any::<bool>(), any::<u16>(), string(), will, option::of(string()), option::of(binary()), props).prop_map(
        move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
            // 3.1.1: a password needs a user name.
            let password = if v5 || username.is_some() { password } else { None };
            // 3.1.1: an empty client id needs clean session.
            let clean_start = clean_start || (!v5 && client_id.is_empty());
            Packet::Connect(Connect {
                protocol: ProtocolVersionOrDefault(v),
                clean_start,
                keep_alive,
                client_id,
                will,
                username,
                password,
                properties,
            })
        },
    )
}

fn connack(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v.is_v5();
    let reasons = if v5 {
        v5_codes(PacketType::ConnAck)
    } else {
        (0..=5).filter_map(reason::connack_from_v311_code).collect()
    };
    let props_a = (
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        option::of(0..=1u8),
        flag(),
        option::of(1..=u32::MAX),
        option::of(string()),
        option::of(any::<u16>()),
        option::of(string()),
        user(),
    );
    let props_b = (
        flag(),
        flag(),
        flag(),
        option::of(any::<u16>()),
        option::of(string()),
        option::of(string()),
        auth_pair(),
    );
    (any::<bool>(), select(reasons), props_a, props_b).prop_map(
        move |(
            sp,
            reason_code,
            (se, rm, mq, ra, mps, aci, tam, rs, u),
            (wsa, sia, ssa, ska, ri, sr, (am, ad)),
        )| {
            let properties = if v5 {
                ConnAckProperties {
                    session_expiry_interval: se,
                    receive_maximum: rm,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    assigned_client_identifier: aci,
                    topic_alias_maximum: tam,
                    reason_string: rs,
                    user_properties: u,
                    wildcard_subscription_available: wsa,
                    subscription_identifiers_available: sia,
                    shared_subscription_available: ssa,
                    server_keep_alive: ska,
                    response_information: ri,
                    server_reference: sr,
                    authentication_method: am,
                    authentication_data: ad,
                }
            } else {
                ConnAckProperties::default()
            };
            Packet::ConnAck(ConnAck { session_present: sp && reason_code == 0, reason_code, properties })
        },
    )
}

fn publish(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v.is_v5();
    let props = (
        format(),
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        opt_topic(),
        option::of(binary()),
        user(),
        vec(1..=VBI_MAX, 0..3),
        option::of(string()),
    )
        .prop_map(|(f, e, ta, rt, cd, u, sids, ct)| PublishProperties {
            payload_format_indicator: f,
            message_expiry_interval: e,
            topic_alias: ta,
            response_topic: rt,
            correlation_data: cd,
            user_properties: u,
            subscription_identifiers: sids,
            content_type: ct,
        });
    (any::<bool>(), qos(), any::<bool>(), "[^\u{0}+#]{0,12}", packet_id(), props, vec(any::<u8>(), 0..64))
        .prop_map(move |(dup, qos, retain, topic, id, props, payload)| {
            let properties = if v5 { props } else { PublishProperties::default() };
            // Empty topic only with a topic alias.
            let topic = if topic.is_empty() && properties.topic_alias.is_none() { "t".into() } else { topic };
            let qos0 = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !qos0,
                qos,
                retain,
                topic,
                packet_id: if qos0 { None } else { Some(id) },
                properties,
                payload: Bytes::from(payload),
            })
        })
}

fn pubresp(v: ProtocolVersion, t: PacketType) -> impl Strategy<Value = Packet> {
    let v5 = v.is_v5();
    (packet_id(), select(v5_codes(t)), option::of(string()), user()).prop_map(move |(id, code, rs, u)| {
        let r = if v5 {
            PubResp { packet_id: id, reason_code: code, reason_string: rs, user_properties: u }
        } else {
            PubResp::new(id)
        };
        match t {
            PacketType::PubAck => Packet::PubAck(r),
            PacketType::PubRec => Packet::PubRec(r),
            PacketType::PubRel => Packet::PubRel(r),
            _ => Packet::PubComp(r),
        }
    })
}

fn subscribe(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v.is_v5();
    let rh =
        select(vec![RetainHandling::SendAtSubscribe, RetainHandling::SendIfNew, RetainHandling::DoNotSend]);
    let opts = (qos(), any::<bool>(), any::<bool>(), rh).prop_map(move |(qos, nl, rap, rh)| {
        if v5 {
            SubscriptionOptions { qos, no_local: nl, retain_as_published: rap, retain_handling: rh }
        } else {
            SubscriptionOptions { qos, ..Default::default() }
        }
    });
    let filter = prop_oneof![string(), string().prop_map(|s| format!("$share/{s}"))];
    (packet_id(), vec((filter, opts), 1..4), option::of(1..=VBI_MAX), user()).prop_map(
        move |(packet_id, mut filters, sid, u)| {
            // No Local is a protocol error on a shared subscription.
            for (f, o) in &mut filters {
                o.no_local &= !f.starts_with("$share/");
            }
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                subscription_identifier: if v5 { sid } else { None },
                user_properties: if v5 { u } else { Vec::new() },
            })
        },
    )
}

fn suback(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v.is_v5();
    let codes = if v5 { v5_codes(PacketType::SubAck) } else { vec![0, 1, 2, 0x80] };
    (packet_id(), vec(select(codes), 0..4), option::of(string()), user()).prop_map(
        move |(packet_id, c, rs, u)| {
            Packet::SubAck(if v5 {
                SubAck { packet_id, reason_codes: c, reason_string: rs, user_properties: u }
            } else {
                SubAck { packet_id, reason_codes: c, ..Default::default() }
            })
        },
    )
}

fn unsubscribe(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v.is_v5();
    (packet_id(), vec(string(), 1..4), user()).prop_map(move |(packet_id, filters, u)| {
        Packet::Unsubscribe(Unsubscribe {
            packet_id,
            filters,
            user_properties: if v5 { u } else { Vec::new() },
        })
    })
}

fn unsuback(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v.is_v5();
    (packet_id(), vec(select(v5_codes(PacketType::UnsubAck)), 0..4), option::of(string()), user()).prop_map(
        move |(packet_id, c, rs, u)| {
            Packet::UnsubAck(if v5 {
                UnsubAck { packet_id, reason_codes: c, reason_string: rs, user_properties: u }
            } else {
                UnsubAck { packet_id, ..Default::default() }
            })
        },
    )
}

fn disconnect(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = v.is_v5();
    (
        select(v5_codes(PacketType::Disconnect)),
        option::of(any::<u32>()),
        option::of(string()),
        user(),
        option::of(string()),
    )
        .prop_map(move |(reason_code, se, rs, u, sr)| {
            Packet::Disconnect(if v5 {
                Disconnect {
                    reason_code,
                    session_expiry_interval: se,
                    reason_string: rs,
                    user_properties: u,
                    server_reference: sr,
                }
            } else {
                Disconnect::default()
            })
        })
}

fn auth() -> impl Strategy<Value = Packet> {
    (select(v5_codes(PacketType::Auth)), auth_pair(), option::of(string()), user()).prop_map(
        |(reason_code, (am, ad), rs, u)| {
            Packet::Auth(Auth {
                reason_code,
                authentication_method: am,
                authentication_data: ad,
                reason_string: rs,
                user_properties: u,
            })
        },
    )
}

/// Any valid packet for `v`, CONNECT excluded (it needs `version: None` to decode).
fn session_packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let mut s = vec![
        connack(v).boxed(),
        publish(v).boxed(),
        publish(v).boxed(),
        pubresp(v, PacketType::PubAck).boxed(),
        pubresp(v, PacketType::PubRec).boxed(),
        pubresp(v, PacketType::PubRel).boxed(),
        pubresp(v, PacketType::PubComp).boxed(),
        subscribe(v).boxed(),
        suback(v).boxed(),
        unsubscribe(v).boxed(),
        unsuback(v).boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(v).boxed(),
    ];
    if v.is_v5() {
        s.push(auth().boxed());
    }
    proptest::strategy::Union::new(s).boxed()
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    select(vec![ProtocolVersion::V311, ProtocolVersion::V5])
}

/// A version and a packet valid for it; CONNECT comes with `decode_version` None.
fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    version().prop_flat_map(|v| {
        prop_oneof![1 => connect(v).boxed(), 8 => session_packet(v)].prop_map(move |p| (v, p))
    })
}

fn decode_version(v: ProtocolVersion, p: &Packet) -> Option<ProtocolVersion> {
    if matches!(p, Packet::Connect(_)) {
        None
    } else {
        Some(v)
    }
}

const MAX: usize = 1 << 20;

/// Heap a decode may take beyond max_packet_size: the shared header `bytes`
/// allocates once when a frame is split off, and an error's short message.
const SLACK: isize = 128;

fn enc(p: &Packet, v: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    encode(p, v, &mut out).expect("valid packets encode");
    out
}

/// What the fuzz target checks too: a decoded packet re-encodes to itself.
fn check_reencode(p: &Packet, version: Option<ProtocolVersion>) {
    let v = match (p, version) {
        (Packet::Connect(c), _) => c.protocol.0,
        (_, Some(v)) => v,
        (_, None) => panic!("only CONNECT decodes before the version is known"),
    };
    let mut buf = enc(p, v);
    assert_eq!(buf.len(), encoded_len(p, v));
    let again = decode(&mut buf, version, MAX).expect("re-encoded packet decodes").expect("complete");
    assert_eq!(&again, p);
    assert!(buf.is_empty());
}

// ------------------------------------------------------------ properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn valid_packets_round_trip((v, p) in versioned_packet()) {
        let mut buf = enc(&p, v);
        prop_assert_eq!(buf.len(), encoded_len(&p, v));
        let back = decode(&mut buf, decode_version(v, &p), MAX);
        prop_assert_eq!(back, Ok(Some(p)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn v5_packets_encode_for_v311_clients(p in prop_oneof![connect(ProtocolVersion::V5), session_packet(ProtocolVersion::V5)]) {
        // The broker builds one packet and writes it for either version: for
        // 3.1.1 the MQTT 5 fields are dropped and encoded_len must follow.
        let v3 = ProtocolVersion::V311;
        let mut out = BytesMut::new();
        match encode(&p, v3, &mut out) {
            Ok(()) => {
                prop_assert_eq!(out.len(), encoded_len(&p, v3));
                let is_connect = matches!(p, Packet::Connect(_));
                let version = if is_connect { None } else { Some(v3) };
                // What 3.1.1 can express decodes (an alias-only topic cannot).
                let alias_only = matches!(&p, Packet::Publish(x) if x.topic.is_empty());
                let empty_id = matches!(&p, Packet::Connect(c) if c.client_id.is_empty() && !c.clean_start);
                if !alias_only && !empty_id {
                    let back = decode(&mut out, version, MAX);
                    prop_assert!(matches!(back, Ok(Some(_))), "{:?}", back);
                }
            }
            Err(e) => prop_assert!(
                matches!(
                    (&p, &e),
                    (Packet::Auth(_), EncodeError::NotInVersion { .. })
                        | (Packet::Connect(_), EncodeError::PasswordWithoutUsername)
                ),
                "{:?}", e
            ),
        }
    }

    #[test]
    fn split_stream_decodes_the_same_packets(
        (v, packets) in version().prop_flat_map(|v| vec(session_packet(v), 1..6).prop_map(move |p| (v, p))),
        cuts in vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut stream = BytesMut::new();
        for p in &packets {
            encode(p, v, &mut stream).expect("valid packets encode");
        }
        let stream = stream.freeze();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(stream.len());
        points.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut from = 0;
        for to in points {
            buf.extend_from_slice(&stream[from..to]);
            from = to;
            while let Some(p) = decode(&mut buf, Some(v), MAX).expect("valid stream") {
                got.push(p);
            }
        }
        prop_assert_eq!(got, packets);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn garbage_never_panics(
        bytes in vec(any::<u8>(), 0..300),
        version in option::of(version()),
        max in 0usize..400,
        cuts in vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.push(bytes.len());
        points.sort_unstable();
        let mut buf = BytesMut::new();
        let mut from = 0;
        'feed: for to in points {
            buf.extend_from_slice(&bytes[from..to]);
            from = to;
            loop {
                let before = buf.len();
                let (r, peak) = peak_heap(|| decode(&mut buf, version, max));
                prop_assert!(peak <= max as isize + SLACK, "peak {} for max {}", peak, max);
                match r {
                    Ok(Some(p)) => check_reencode(&p, version),
                    Ok(None) => {
                        prop_assert_eq!(buf.len(), before);
                        break;
                    }
                    Err(_) => break 'feed,
                }
            }
        }
    }

    #[test]
    fn mutated_packets_never_panic(
        (v, p) in versioned_packet(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        tight in any::<bool>(),
    ) {
        let mut bytes = enc(&p, v).to_vec();
        for (i, b) in &flips {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        let version = decode_version(v, &p);
        let max = if tight { bytes.len() } else { MAX };
        let mut buf = BytesMut::from(&bytes[..]);
        let (r, peak) = peak_heap(|| decode(&mut buf, version, max));
        prop_assert!(peak <= max as isize + SLACK, "peak {} for max {}", peak, max);
        match r {
            Ok(Some(p)) => check_reencode(&p, version),
            Ok(None) => prop_assert_eq!(buf.len(), bytes.len()),
            Err(e) => {
                // Every error carries a real reason code.
                prop_assert!(e.reason_code() >= 0x80, "{:?}", e);
            }
        }
    }
}

proptest! {
    #[test]
    fn floods_of_tiny_items_stay_within_the_limit(
        n in 0usize..400,
        kind in 0u8..3,
        slack in 0usize..64,
    ) {
        // Many empty user properties, topic filters or unsubscribe filters:
        // few bytes on the wire each, a Vec slot of 24 to 48 bytes each decoded.
        let (first, body) = match kind {
            0 => {
                let mut props = Vec::new();
                for _ in 0..n {
                    props.extend_from_slice(&[0x26, 0, 0, 0, 0]);
                }
                let mut body = b"\x00\x01t".to_vec();
                put_vbi(&mut body, props.len());
                body.extend_from_slice(&props);
                (0x30, body)
            }
            1 => {
                let mut body = vec![0, 1, 0];
                for _ in 0..=n {
                    body.extend_from_slice(&[0, 0, 1]);
                }
                (0x82, body)
            }
            _ => {
                let mut body = vec![0, 1, 0];
                for _ in 0..=n {
                    body.extend_from_slice(&[0, 0]);
                }
                (0xA2, body)
            }
        };
        let mut bytes = vec![first];
        put_vbi(&mut bytes, body.len());
        bytes.extend_from_slice(&body);
        let max = bytes.len() + slack;
        let mut buf = BytesMut::from(&bytes[..]);
        let (r, peak) = peak_heap(|| decode(&mut buf, Some(ProtocolVersion::V5), max));
        prop_assert!(peak <= max as isize + SLACK, "peak {} for max {}", peak, max);
        match r {
            Ok(Some(p)) => check_reencode(&p, Some(ProtocolVersion::V5)),
            Err(e) => prop_assert_eq!(e.reason_code(), reason::PACKET_TOO_LARGE),
            Ok(None) => prop_assert!(false, "complete packet reported incomplete"),
        }
    }
}

fn put_vbi(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n & 0x7F) as u8;
        n >>= 7;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

#[test]
fn meter_counts_allocations() {
    let (v, peak) = peak_heap(|| vec![0u8; 1000]);
    assert_eq!(v.len(), 1000);
    assert!(peak >= 1000, "peak {peak}");
}
