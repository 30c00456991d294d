//! Unit tests of the codec: hand-written byte vectors from the specs, every
//! error case the decoder checks, and round trips of both versions.

use bytes::{Bytes, BytesMut};

use super::*;

const V3: Option<ProtocolVersion> = Some(ProtocolVersion::V311);
const V5: Option<ProtocolVersion> = Some(ProtocolVersion::V5);
const MAX: usize = 1 << 20;

fn dec(bytes: &[u8], version: Option<ProtocolVersion>) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let r = decode(&mut buf, version, MAX);
    if let Ok(Some(_)) = r {
        assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
    }
    r
}

fn ok(bytes: &[u8], version: Option<ProtocolVersion>) -> Packet {
    match dec(bytes, version) {
        Ok(Some(p)) => p,
        other => panic!("expected a packet from {bytes:02x?}, got {other:?}"),
    }
}

fn err(bytes: &[u8], version: Option<ProtocolVersion>) -> DecodeError {
    match dec(bytes, version) {
        Err(e) => e,
        other => panic!("expected an error from {bytes:02x?}, got {other:?}"),
    }
}

fn enc(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(p, v, &mut out).unwrap();
    assert_eq!(out.len(), encoded_len(p, v), "encoded_len of {p:?}");
    out.to_vec()
}

/// decode(encode(p)) == p and encoded_len matches.
fn round_trip(p: &Packet, v: ProtocolVersion) {
    let bytes = enc(p, v);
    let version = if matches!(p, Packet::Connect(_)) { None } else { Some(v) };
    let back = ok(&bytes, version);
    assert_eq!(&back, p, "round trip for {v:?}");
}

/// Builds a packet: first byte, then the body with its remaining length.
fn pkt(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n & 0x7F) as u8;
        n >>= 7;
        if n > 0 {
            b |= 0x80;
        }
        v.push(b);
        if n == 0 {
            break;
        }
    }
    v.extend_from_slice(body);
    v
}

fn connect_body(level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 60];
    b.extend_from_slice(rest);
    b
}

// ---------------------------------------------------------------- CONNECT

#[test]
fn connect_v311_minimal() {
    let bytes = [0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 0];
    let Packet::Connect(c) = ok(&bytes, None) else { panic!("not a CONNECT") };
    assert_eq!(c.protocol.0, ProtocolVersion::V311);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 60);
    assert_eq!(c.client_id, "");
    assert!(c.will.is_none() && c.username.is_none() && c.password.is_none());
    assert_eq!(enc(&Packet::Connect(c), ProtocolVersion::V311), bytes);
}

#[test]
fn connect_v5_minimal_and_properties() {
    let bytes = pkt(0x10, &connect_body(5, 0x02, &[0, 0, 2, b'c', b'1']));
    let Packet::Connect(c) = ok(&bytes, None) else { panic!("not a CONNECT") };
    assert_eq!(c.protocol.0, ProtocolVersion::V5);
    assert_eq!(c.client_id, "c1");

    // Session expiry 0x11 = 3600, receive maximum 0x21 = 10.
    let props = [8, 0x11, 0, 0, 0x0E, 0x10, 0x21, 0, 10];
    let mut rest = props.to_vec();
    rest.extend_from_slice(&[0, 1, b'x']);
    let Packet::Connect(c) = ok(&pkt(0x10, &connect_body(5, 0, &rest)), None) else { panic!() };
    assert_eq!(c.properties.session_expiry_interval, Some(3600));
    assert_eq!(c.properties.receive_maximum, Some(10));
    assert!(!c.clean_start);
}

#[test]
fn connect_v311_will_user_password() {
    // will QoS 1, retain, will flag, username, password, clean session.
    let flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02;
    let rest = [
        0, 2, b'i', b'd', //
        0, 3, b'w', b'/', b't', 0, 2, b'b', b'y', //
        0, 1, b'u', 0, 2, 0xFF, 0x00,
    ];
    let Packet::Connect(c) = ok(&pkt(0x10, &connect_body(4, flags, &rest)), None) else { panic!() };
    let will = c.will.as_ref().unwrap();
    assert_eq!(will.topic, "w/t");
    assert_eq!(&will.payload[..], b"by");
    assert_eq!(will.qos, QoS::AtLeastOnce);
    assert!(will.retain);
    assert_eq!(c.username.as_deref(), Some("u"));
    assert_eq!(c.password.as_deref(), Some(&[0xFF, 0x00][..]));
    round_trip(&Packet::Connect(c), ProtocolVersion::V311);
}

#[test]
fn connect_protocol_name_and_level_errors() {
    // MQTT 3.1: "MQIsdp" level 3.
    let mut b = vec![0, 6];
    b.extend_from_slice(b"MQIsdp");
    b.extend_from_slice(&[3, 2, 0, 60, 0, 1, b'a']);
    let e = err(&pkt(0x10, &b), None);
    assert_eq!(e, DecodeError::UnsupportedProtocolVersion { level: 3 });
    assert_eq!(e.reason_code(), reason::UNSUPPORTED_PROTOCOL_VERSION);
    assert!(e.is_connect_error());
    assert_eq!(e.connack_version(), Some(ProtocolVersion::V311));
    assert_eq!(reason::connack_v311_code(e.reason_code()), 1);

    let e = err(&pkt(0x10, &connect_body(6, 2, &[0, 0])), None);
    assert_eq!(e, DecodeError::UnsupportedProtocolVersion { level: 6 });

    let mut b = vec![0, 4];
    b.extend_from_slice(b"MQTX");
    b.extend_from_slice(&[4, 2, 0, 60, 0, 0]);
    let e = err(&pkt(0x10, &b), None);
    assert!(matches!(e, DecodeError::InvalidProtocolName { .. }), "{e:?}");
    assert_eq!(e.reason_code(), 0x84);
}

#[test]
fn connect_flag_errors() {
    let reserved = err(&pkt(0x10, &connect_body(4, 0x03, &[0, 0])), None);
    assert!(matches!(reserved, DecodeError::ReservedBits { .. }), "{reserved:?}");
    assert_eq!(reserved.reason_code(), 0x81);
    assert!(reserved.is_connect_error());
    assert_eq!(reserved.connack_version(), Some(ProtocolVersion::V311));

    // Will QoS 3.
    let e = err(&pkt(0x10, &connect_body(5, 0x04 | 0x18, &[0, 0, 0])), None);
    assert!(matches!(e, DecodeError::InvalidQoS { .. }), "{e:?}");
    assert_eq!(e.connack_version(), Some(ProtocolVersion::V5));
    // Will QoS without will flag, will retain without will flag.
    for flags in [0x08, 0x20] {
        let e = err(&pkt(0x10, &connect_body(4, flags, &[0, 0])), None);
        assert!(matches!(e, DecodeError::ReservedBits { .. }), "{e:?}");
    }
    // Password without user name: an error in 3.1.1 only.
    let e = err(&pkt(0x10, &connect_body(4, 0x40, &[0, 0, 0, 1, b'p'])), None);
    assert_eq!(e, DecodeError::PasswordWithoutUsername);
    let Packet::Connect(c) = ok(&pkt(0x10, &connect_body(5, 0x40, &[0, 0, 0, 0, 1, b'p'])), None) else {
        panic!()
    };
    assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
    assert_eq!(c.username, None);
}

#[test]
fn connect_string_errors() {
    let e = err(&pkt(0x10, &connect_body(4, 2, &[0, 2, 0xC3, 0x28])), None);
    assert!(matches!(e, DecodeError::InvalidUtf8 { .. }), "{e:?}");
    assert!(e.is_connect_error());
    let e = err(&pkt(0x10, &connect_body(4, 2, &[0, 2, b'a', 0])), None);
    assert!(matches!(e, DecodeError::NullCharacter { .. }), "{e:?}");
    assert_eq!(e.reason_code(), 0x81);
    // Surrogate code point encoded in UTF-8 (ED A0 80) is not well-formed.
    let e = err(&pkt(0x10, &connect_body(4, 2, &[0, 3, 0xED, 0xA0, 0x80])), None);
    assert!(matches!(e, DecodeError::InvalidUtf8 { .. }), "{e:?}");
    // String longer than the packet.
    let e = err(&pkt(0x10, &connect_body(4, 2, &[0, 9, b'a'])), None);
    assert!(matches!(e, DecodeError::UnexpectedEnd { .. }), "{e:?}");
    // Trailing bytes after the last field.
    let e = err(&pkt(0x10, &connect_body(4, 2, &[0, 1, b'a', 7])), None);
    assert_eq!(e, DecodeError::TrailingBytes { ctx: ctx(PacketType::Connect, V3), extra: 1 });
}

fn ctx(packet: PacketType, version: Option<ProtocolVersion>) -> Ctx {
    Ctx { packet, version }
}

#[test]
fn connect_property_errors() {
    let cases: Vec<(Vec<u8>, u8)> = vec![
        // duplicate session expiry
        (vec![10, 0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2], 0x82),
        // receive maximum 0
        (vec![3, 0x21, 0, 0], 0x82),
        // maximum packet size 0
        (vec![5, 0x27, 0, 0, 0, 0], 0x82),
        // request problem information 2
        (vec![2, 0x17, 2], 0x82),
        // topic alias is not a CONNECT property
        (vec![3, 0x23, 0, 1], 0x81),
        // unknown property
        (vec![2, 0x7F, 0], 0x81),
        // authentication data without method
        (vec![4, 0x16, 0, 1, 9], 0x82),
        // property length past the end of the packet
        (vec![9, 0x11, 0, 0], 0x81),
        // property value cut by the property length
        (vec![3, 0x11, 0, 0, 0, 0], 0x81),
    ];
    for (props, code) in cases {
        let mut rest = props.clone();
        rest.extend_from_slice(&[0, 0]);
        let e = err(&pkt(0x10, &connect_body(5, 2, &rest)), None);
        assert_eq!(e.reason_code(), code, "{props:02x?}: {e}");
        assert!(e.is_connect_error());
    }
}

#[test]
fn connect_v311_empty_client_id_needs_clean_session() {
    let e = err(&pkt(0x10, &connect_body(4, 0, &[0, 0])), None);
    assert_eq!(e, DecodeError::EmptyClientIdWithoutCleanSession);
    assert_eq!(reason::connack_v311_code(e.reason_code()), 2);
    assert_eq!(e.connack_version(), Some(ProtocolVersion::V311));
    // MQTT 5 lets the server assign one whatever Clean Start says.
    assert!(matches!(ok(&pkt(0x10, &connect_body(5, 0, &[0, 0, 0])), None), Packet::Connect(_)));
}

#[test]
fn connect_will_topic_must_be_a_topic_name() {
    let rest = [0, 0, 0, 1, b'#', 0, 0];
    let e = err(&pkt(0x10, &connect_body(4, 0x06, &rest)), None);
    assert_eq!(e.reason_code(), reason::TOPIC_NAME_INVALID);
    assert!(e.is_connect_error());
}

#[test]
fn first_packet_must_be_connect() {
    let e = err(&[0xC0, 0x00], None);
    assert_eq!(e, DecodeError::ExpectedConnect { packet: PacketType::PingReq });
    assert!(!e.is_connect_error());
    assert_eq!(e.reason_code(), 0x82);
}

// ---------------------------------------------------------------- fixed header

#[test]
fn incomplete_packets_need_more_bytes() {
    let full = pkt(0x32, &[0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i']);
    for cut in 0..full.len() {
        let mut buf = BytesMut::from(&full[..cut]);
        assert_eq!(decode(&mut buf, V3, MAX), Ok(None), "cut at {cut}");
        assert_eq!(buf.len(), cut, "nothing consumed");
    }
    // Two packets back to back come out one at a time.
    let mut two = full.clone();
    two.extend_from_slice(&[0xC0, 0]);
    let mut buf = BytesMut::from(&two[..]);
    assert!(matches!(decode(&mut buf, V3, MAX), Ok(Some(Packet::Publish(_)))));
    assert_eq!(decode(&mut buf, V3, MAX), Ok(Some(Packet::PingReq)));
    assert_eq!(decode(&mut buf, V3, MAX), Ok(None));
}

#[test]
fn remaining_length_rules() {
    // Five bytes of remaining length.
    let e = err(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], V3);
    assert!(matches!(e, DecodeError::InvalidVarInt { .. }), "{e:?}");
    assert_eq!(e.reason_code(), 0x81);
    // Not the shortest encoding.
    let e = err(&[0xC0, 0x80, 0x00], V3);
    assert!(matches!(e, DecodeError::InvalidVarInt { .. }), "{e:?}");
    // Largest value, four bytes.
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
    let e = decode(&mut buf, V3, MAX).unwrap_err();
    assert_eq!(
        e,
        DecodeError::PacketTooLarge {
            ctx: ctx(PacketType::Publish, V3),
            size: 5 + MAX_REMAINING_LENGTH,
            max: MAX
        }
    );
}

#[test]
fn packet_too_large_is_refused_before_buffering() {
    // Only the fixed header is buffered: the limit must already apply.
    let header = [0x30, 0xE8, 0x07]; // remaining length 1000
    let mut buf = BytesMut::from(&header[..]);
    let e = decode(&mut buf, V5, 1000).unwrap_err();
    assert_eq!(e.reason_code(), reason::PACKET_TOO_LARGE);
    assert_eq!(e, DecodeError::PacketTooLarge { ctx: ctx(PacketType::Publish, V5), size: 1003, max: 1000 });
    // Exactly at the limit is fine (and incomplete here).
    let mut buf = BytesMut::from(&header[..]);
    assert_eq!(decode(&mut buf, V5, 1003), Ok(None));
    // Before CONNECT too.
    let mut buf = BytesMut::from(&[0x10, 0xFF, 0x7F][..]);
    let e = decode(&mut buf, None, 100).unwrap_err();
    assert!(e.is_connect_error());
    assert_eq!(e.reason_code(), 0x95);
    assert_eq!(e.connack_version(), Some(ProtocolVersion::V311));
    // A too large MQTT 5 CONNECT is answered in MQTT 5 once its level is buffered.
    let mut buf = BytesMut::from(&[0x10, 0xFF, 0x7F, 0, 4, b'M', b'Q', b'T', b'T', 5][..]);
    let e = decode(&mut buf, None, 100).unwrap_err();
    assert_eq!(e.connack_version(), Some(ProtocolVersion::V5));
    assert_eq!(e.reason_code(), 0x95);
}

#[test]
fn reserved_fixed_header_flags() {
    // SUBSCRIBE, UNSUBSCRIBE, PUBREL need 0b0010.
    for first in [0x80, 0x83, 0xA0, 0xA6, 0x60, 0x6A] {
        let e = err(&pkt(first, &[0, 1, 0, 1, b'a', 0]), V3);
        assert!(matches!(e, DecodeError::InvalidFlags { .. }), "{first:#x}: {e:?}");
        assert_eq!(e.reason_code(), 0x81);
    }
    // Every other non-PUBLISH packet needs 0.
    for first in [0x41, 0x52, 0x71, 0x91, 0xB1, 0xC1, 0xD8, 0xE1, 0x21] {
        let e = err(&pkt(first, &[0, 1]), V5);
        assert!(matches!(e, DecodeError::InvalidFlags { .. }), "{first:#x}: {e:?}");
    }
    let e = err(&pkt(0x11, &connect_body(4, 2, &[0, 0])), None);
    assert!(matches!(e, DecodeError::InvalidFlags { .. }));
    // Reserved packet type 0; AUTH in 3.1.1.
    assert!(matches!(err(&[0x00, 0x00], V3), DecodeError::InvalidPacketType { packet_type: 0, .. }));
    assert!(matches!(err(&[0xF0, 0x00], V3), DecodeError::InvalidPacketType { packet_type: 15, .. }));
}

// ---------------------------------------------------------------- PUBLISH

#[test]
fn publish_v311() {
    let bytes = pkt(0x30, b"\x00\x03a/bhello");
    let Packet::Publish(p) = ok(&bytes, V3) else { panic!() };
    assert_eq!(p.topic, "a/b");
    assert_eq!(p.qos, QoS::AtMostOnce);
    assert_eq!(p.packet_id, None);
    assert_eq!(&p.payload[..], b"hello");
    assert_eq!(enc(&Packet::Publish(p), ProtocolVersion::V311), bytes);

    let bytes = pkt(0x3D, b"\x00\x01t\x12\x34");
    let Packet::Publish(p) = ok(&bytes, V3) else { panic!() };
    assert!(p.dup && p.retain);
    assert_eq!(p.qos, QoS::ExactlyOnce);
    assert_eq!(p.packet_id, Some(0x1234));
    assert!(p.payload.is_empty());
    assert_eq!(enc(&Packet::Publish(p), ProtocolVersion::V311), bytes);
}

#[test]
fn publish_payload_is_zero_copy() {
    let bytes = pkt(0x30, b"\x00\x01tpayload");
    let mut buf = BytesMut::from(&bytes[..]);
    let base = buf.as_ptr() as usize;
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, V3, MAX) else { panic!() };
    assert_eq!(p.payload.as_ptr() as usize, base + 5);
}

#[test]
fn publish_v5_properties() {
    let mut body = b"\x00\x03a/b\x00\x07".to_vec();
    let props: &[u8] = &[
        0x01, 1, // payload format
        0x02, 0, 0, 0, 60, // message expiry
        0x23, 0, 5, // topic alias
        0x0B, 0x81, 0x01, // subscription id 129
        0x0B, 0x02, // subscription id 2
        0x03, 0, 4, b't', b'e', b'x', b't', // content type
        0x26, 0, 1, b'k', 0, 1, b'v', // user property
        0x26, 0, 1, b'k', 0, 1, b'w', // repeated name
    ];
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    body.extend_from_slice(b"data");
    let Packet::Publish(p) = ok(&pkt(0x32, &body), V5) else { panic!() };
    assert_eq!(p.packet_id, Some(7));
    assert_eq!(p.properties.payload_format_indicator, Some(1));
    assert_eq!(p.properties.message_expiry_interval, Some(60));
    assert_eq!(p.properties.topic_alias, Some(5));
    assert_eq!(p.properties.subscription_identifiers, vec![129, 2]);
    assert_eq!(p.properties.content_type.as_deref(), Some("text"));
    assert_eq!(
        p.properties.user_properties,
        vec![("k".to_string(), "v".to_string()), ("k".to_string(), "w".to_string())]
    );
    assert_eq!(&p.payload[..], b"data");
    round_trip(&Packet::Publish(p), ProtocolVersion::V5);
}

#[test]
fn publish_errors() {
    let qos3 = err(&pkt(0x36, b"\x00\x01t\x00\x01"), V3);
    assert_eq!(qos3, DecodeError::InvalidQoS { ctx: ctx(PacketType::Publish, V3) });
    assert_eq!(qos3.reason_code(), 0x81);
    let dup0 = err(&pkt(0x38, b"\x00\x01t"), V3);
    assert_eq!(dup0.reason_code(), 0x82);
    let id0 = err(&pkt(0x32, b"\x00\x01t\x00\x00"), V3);
    assert_eq!(id0, DecodeError::ZeroPacketId { ctx: ctx(PacketType::Publish, V3) });
    let wild = err(&pkt(0x30, b"\x00\x03a/+"), V3);
    assert_eq!(wild.reason_code(), reason::TOPIC_NAME_INVALID);
    let wild = err(&pkt(0x30, b"\x00\x01#\x00"), V5);
    assert_eq!(wild.reason_code(), reason::TOPIC_NAME_INVALID);
    let empty = err(&pkt(0x30, b"\x00\x00x"), V3);
    assert_eq!(empty.reason_code(), reason::TOPIC_NAME_INVALID);
    let empty = err(&pkt(0x30, b"\x00\x00\x00"), V5);
    assert_eq!(empty.reason_code(), reason::TOPIC_NAME_INVALID);
    // Truncated packet id.
    let cut = err(&pkt(0x32, b"\x00\x01t\x00"), V3);
    assert!(matches!(cut, DecodeError::UnexpectedEnd { .. }), "{cut:?}");
    assert!(!cut.is_connect_error());
    assert_eq!(cut.connack_version(), None);

    let props_cases: &[(&[u8], u8)] = &[
        (&[3, 0x23, 0, 0], 0x82),                   // topic alias 0
        (&[2, 0x0B, 0], 0x82),                      // subscription identifier 0
        (&[2, 0x01, 2], 0x82),                      // payload format 2
        (&[6, 0x23, 0, 1, 0x23, 0, 2], 0x82),       // duplicate topic alias
        (&[2, 0x11, 0], 0x81),                      // session expiry not allowed
        (&[5, 0x0B, 0xFF, 0xFF, 0xFF, 0xFF], 0x81), // subscription id of 5 bytes
        (&[4, 0x08, 0, 1, b'#'], 0x82),             // wildcard in response topic
    ];
    for (props, code) in props_cases {
        let mut body = b"\x00\x01t".to_vec();
        body.extend_from_slice(props);
        let e = err(&pkt(0x30, &body), V5);
        assert_eq!(e.reason_code(), *code, "{props:02x?}: {e}");
    }
    // Empty topic with a topic alias is fine in MQTT 5.
    let Packet::Publish(p) = ok(&pkt(0x30, &[0, 0, 3, 0x23, 0, 9, b'x']), V5) else { panic!() };
    assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("", Some(9)));
}

#[test]
fn memory_budget_refuses_floods_of_tiny_items() {
    // 100 empty user properties: 500 bytes of properties, ~5 KB of Vec.
    let mut props = Vec::new();
    for _ in 0..100 {
        props.extend_from_slice(&[0x26, 0, 0, 0, 0]);
    }
    let mut body = b"\x00\x01t".to_vec();
    body.extend_from_slice(&[0xF4, 0x03]); // 500
    body.extend_from_slice(&props);
    let bytes = pkt(0x30, &body);
    let mut buf = BytesMut::from(&bytes[..]);
    let e = decode(&mut buf, V5, 1024).unwrap_err();
    assert!(matches!(e, DecodeError::MemoryLimit { max: 1024, .. }), "{e:?}");
    assert_eq!(e.reason_code(), 0x95);
    let Packet::Publish(p) = ok(&bytes, V5) else { panic!() };
    assert_eq!(p.properties.user_properties.len(), 100);
}

// ---------------------------------------------------------------- acks

#[test]
fn puback_family() {
    let Packet::PubAck(a) = ok(&[0x40, 2, 0, 1], V3) else { panic!() };
    assert_eq!(a, PubResp::new(1));
    let Packet::PubRel(a) = ok(&[0x62, 2, 0, 1], V3) else { panic!() };
    assert_eq!(a, PubResp::new(1));
    assert!(matches!(ok(&[0x50, 2, 0, 9], V5), Packet::PubRec(_)));
    assert!(matches!(ok(&[0x70, 2, 0, 9], V5), Packet::PubComp(_)));
    // 3.1.1 has no reason code.
    assert!(matches!(err(&[0x40, 3, 0, 1, 0], V3), DecodeError::TrailingBytes { extra: 1, .. }));
    // MQTT 5 short forms.
    let Packet::PubAck(a) = ok(&[0x40, 3, 0, 1, 0x10], V5) else { panic!() };
    assert_eq!(a, PubResp::with_reason(1, reason::NO_MATCHING_SUBSCRIBERS));
    let Packet::PubAck(a) = ok(&[0x40, 4, 0, 1, 0x10, 0], V5) else { panic!() };
    assert_eq!(a, PubResp::with_reason(1, 0x10));
    let Packet::PubComp(a) = ok(&[0x70, 8, 0, 1, 0x92, 4, 0x1F, 0, 1, b'r'], V5) else { panic!() };
    assert_eq!(a.reason_code, reason::PACKET_IDENTIFIER_NOT_FOUND);
    assert_eq!(a.reason_string.as_deref(), Some("r"));
    // Invalid reason codes per packet type.
    assert!(matches!(err(&[0x40, 3, 0, 1, 0x92], V5), DecodeError::InvalidReasonCode { code: 0x92, .. }));
    assert!(matches!(err(&[0x62, 3, 0, 1, 0x10], V5), DecodeError::InvalidReasonCode { code: 0x10, .. }));
    assert_eq!(err(&[0x40, 2, 0, 0], V5).reason_code(), 0x82);
    // Topic alias is no PUBACK property.
    assert_eq!(err(&[0x40, 7, 0, 1, 0, 3, 0x23, 0, 1], V5).reason_code(), 0x81);
    assert!(matches!(err(&[0x40, 1, 0], V5), DecodeError::UnexpectedEnd { .. }));
    assert!(matches!(err(&[0x40, 0], V5), DecodeError::UnexpectedEnd { .. }));
}

#[test]
fn puback_encoding_short_forms() {
    let v5 = ProtocolVersion::V5;
    assert_eq!(enc(&Packet::PubAck(PubResp::new(1)), v5), [0x40, 2, 0, 1]);
    assert_eq!(enc(&Packet::PubRec(PubResp::with_reason(1, 0x10)), v5), [0x50, 3, 0, 1, 0x10]);
    assert_eq!(enc(&Packet::PubRel(PubResp::new(2)), v5), [0x62, 2, 0, 2]);
    let with_props = PubResp { reason_string: Some("r".into()), ..PubResp::new(3) };
    assert_eq!(enc(&Packet::PubComp(with_props), v5), [0x70, 8, 0, 3, 0, 4, 0x1F, 0, 1, b'r']);
    // 3.1.1 drops reason and properties.
    let full = PubResp { reason_string: Some("r".into()), ..PubResp::with_reason(3, 0x80) };
    assert_eq!(enc(&Packet::PubAck(full), ProtocolVersion::V311), [0x40, 2, 0, 3]);
}

#[test]
fn connack() {
    let Packet::ConnAck(c) = ok(&[0x20, 2, 1, 0], V3) else { panic!() };
    assert!(c.session_present);
    assert_eq!(c.reason_code, 0);
    let Packet::ConnAck(c) = ok(&[0x20, 2, 0, 5], V3) else { panic!() };
    assert_eq!(c.reason_code, reason::NOT_AUTHORIZED);
    assert!(matches!(err(&[0x20, 2, 0, 6], V3), DecodeError::InvalidReasonCode { code: 6, .. }));
    assert!(matches!(err(&[0x20, 2, 2, 0], V3), DecodeError::ReservedBits { .. }));
    assert_eq!(err(&[0x20, 2, 1, 5], V3).reason_code(), 0x82);
    let Packet::ConnAck(c) = ok(&[0x20, 3, 0, 0x85, 0], V5) else { panic!() };
    assert_eq!(c.reason_code, reason::CLIENT_IDENTIFIER_NOT_VALID);
    assert!(matches!(err(&[0x20, 3, 0, 0x10, 0], V5), DecodeError::InvalidReasonCode { .. }));
    // Maximum QoS 2 is a protocol error.
    assert_eq!(err(&[0x20, 5, 0, 0, 2, 0x24, 2], V5).reason_code(), 0x82);
    // 3.1.1 needs exactly 2 bytes.
    assert!(matches!(err(&[0x20, 3, 0, 0, 0], V3), DecodeError::TrailingBytes { .. }));
}

#[test]
fn connack_v311_encoding_maps_reason_codes() {
    let v3 = ProtocolVersion::V311;
    let ack = |reason_code, session_present| {
        Packet::ConnAck(ConnAck { session_present, reason_code, ..Default::default() })
    };
    assert_eq!(enc(&ack(0, true), v3), [0x20, 2, 1, 0]);
    assert_eq!(enc(&ack(reason::UNSUPPORTED_PROTOCOL_VERSION, false), v3), [0x20, 2, 0, 1]);
    assert_eq!(enc(&ack(reason::CLIENT_IDENTIFIER_NOT_VALID, false), v3), [0x20, 2, 0, 2]);
    assert_eq!(enc(&ack(reason::BANNED, false), v3), [0x20, 2, 0, 3]);
    assert_eq!(enc(&ack(reason::BAD_USER_NAME_OR_PASSWORD, false), v3), [0x20, 2, 0, 4]);
    // Session present is never sent with an error code.
    assert_eq!(enc(&ack(reason::NOT_AUTHORIZED, true), v3), [0x20, 2, 0, 5]);
    assert_eq!(enc(&ack(0, true), ProtocolVersion::V5), [0x20, 3, 1, 0, 0]);
}

// ---------------------------------------------------------------- SUBSCRIBE & co

#[test]
fn subscribe_v311() {
    let bytes = pkt(0x82, b"\x00\x0a\x00\x03a/b\x01\x00\x01#\x02");
    let Packet::Subscribe(s) = ok(&bytes, V3) else { panic!() };
    assert_eq!(s.packet_id, 10);
    assert_eq!(s.filters.len(), 2);
    assert_eq!(s.filters[0].0, "a/b");
    assert_eq!(s.filters[0].1.qos, QoS::AtLeastOnce);
    assert_eq!(s.filters[1].1.qos, QoS::ExactlyOnce);
    assert_eq!(enc(&Packet::Subscribe(s), ProtocolVersion::V311), bytes);
}

#[test]
fn subscribe_v5_options_and_errors() {
    // no local, retain as published, retain handling 2, QoS 1; subscription id 7.
    let bytes = pkt(0x82, b"\x00\x01\x02\x0b\x07\x00\x01a\x2d");
    let Packet::Subscribe(s) = ok(&bytes, V5) else { panic!() };
    assert_eq!(s.subscription_identifier, Some(7));
    let o = s.filters[0].1;
    assert!(o.no_local && o.retain_as_published);
    assert_eq!(o.retain_handling, RetainHandling::DoNotSend);
    assert_eq!(o.qos, QoS::AtLeastOnce);
    assert_eq!(enc(&Packet::Subscribe(s), ProtocolVersion::V5), bytes);

    let cases: &[(&[u8], Option<ProtocolVersion>, u8)] = &[
        (b"\x00\x01", V3, 0x82),                                  // no filter
        (b"\x00\x01\x00", V5, 0x82),                              // no filter
        (b"\x00\x01\x00\x01a\x04", V3, 0x81),                     // 3.1.1: bits 2-7 reserved
        (b"\x00\x01\x00\x00\x01a\x40", V5, 0x81),                 // bit 6 reserved
        (b"\x00\x01\x00\x01a\x03", V3, 0x82),                     // QoS 3
        (b"\x00\x01\x00\x00\x01a\x30", V5, 0x82),                 // retain handling 3
        (b"\x00\x01\x02\x0b\x00\x00\x01a\x00", V5, 0x82),         // subscription id 0
        (b"\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00", V5, 0x82), // twice
        (b"\x00\x00\x00\x01a\x00", V3, 0x82),                     // packet id 0
        (b"\x00\x01\x00\x01a", V3, 0x81),                         // options missing
        (b"\x00\x01\x00\x00\x0a$share/g/a\x04", V5, 0x82),        // no local on a shared subscription
    ];
    for (body, v, code) in cases {
        let e = err(&pkt(0x82, body), *v);
        assert_eq!(e.reason_code(), *code, "{body:02x?}: {e}");
    }
}

#[test]
fn unsubscribe() {
    let bytes = pkt(0xA2, b"\x00\x0b\x00\x03a/b\x00\x01c");
    let Packet::Unsubscribe(u) = ok(&bytes, V3) else { panic!() };
    assert_eq!(u.filters, vec!["a/b".to_string(), "c".to_string()]);
    assert_eq!(enc(&Packet::Unsubscribe(u.clone()), ProtocolVersion::V311), bytes);
    round_trip(&Packet::Unsubscribe(u), ProtocolVersion::V5);
    assert_eq!(
        err(&pkt(0xA2, b"\x00\x0b"), V3),
        DecodeError::NoTopicFilters { ctx: ctx(PacketType::Unsubscribe, V3) }
    );
    assert_eq!(err(&pkt(0xA2, b"\x00\x0b\x00"), V5).reason_code(), 0x82);
}

#[test]
fn suback_and_unsuback() {
    let Packet::SubAck(s) = ok(&[0x90, 4, 0, 10, 1, 0x80], V3) else { panic!() };
    assert_eq!(s.reason_codes, vec![1, 0x80]);
    assert!(matches!(err(&[0x90, 3, 0, 10, 3], V3), DecodeError::InvalidReasonCode { code: 3, .. }));
    assert!(matches!(err(&[0x90, 3, 0, 10, 0x87], V3), DecodeError::InvalidReasonCode { .. }));
    let Packet::SubAck(s) = ok(&[0x90, 5, 0, 10, 0, 0x02, 0x87], V5) else { panic!() };
    assert_eq!(s.reason_codes, vec![2, reason::NOT_AUTHORIZED]);

    // 3.1.1 SUBACK maps every failure to 0x80.
    let ack = SubAck { packet_id: 10, reason_codes: vec![0, 0x87, 0xA2], ..Default::default() };
    assert_eq!(enc(&Packet::SubAck(ack.clone()), ProtocolVersion::V311), [0x90, 5, 0, 10, 0, 0x80, 0x80]);
    round_trip(&Packet::SubAck(ack), ProtocolVersion::V5);

    let Packet::UnsubAck(u) = ok(&[0xB0, 2, 0, 11], V3) else { panic!() };
    assert_eq!(u.packet_id, 11);
    let Packet::UnsubAck(u) = ok(&[0xB0, 5, 0, 11, 0, 0x00, 0x11], V5) else { panic!() };
    assert_eq!(u.reason_codes, vec![0, reason::NO_SUBSCRIPTION_EXISTED]);
    assert!(matches!(err(&[0xB0, 4, 0, 11, 0, 0x01], V5), DecodeError::InvalidReasonCode { .. }));
    // 3.1.1 UNSUBACK has no payload.
    assert_eq!(enc(&Packet::UnsubAck(u.clone()), ProtocolVersion::V311), [0xB0, 2, 0, 11]);
    round_trip(&Packet::UnsubAck(u), ProtocolVersion::V5);
}

// ---------------------------------------------------------------- others

#[test]
fn ping() {
    assert_eq!(ok(&[0xC0, 0], V3), Packet::PingReq);
    assert_eq!(ok(&[0xD0, 0], V5), Packet::PingResp);
    assert!(matches!(err(&[0xC0, 1, 0], V3), DecodeError::TrailingBytes { .. }));
    assert_eq!(enc(&Packet::PingReq, ProtocolVersion::V5), [0xC0, 0]);
}

#[test]
fn disconnect() {
    assert_eq!(ok(&[0xE0, 0], V3), Packet::Disconnect(Disconnect::default()));
    assert!(matches!(err(&[0xE0, 1, 0], V3), DecodeError::TrailingBytes { .. }));
    assert_eq!(ok(&[0xE0, 0], V5), Packet::Disconnect(Disconnect::default()));
    let Packet::Disconnect(d) = ok(&[0xE0, 1, 4], V5) else { panic!() };
    assert_eq!(d.reason_code, reason::DISCONNECT_WITH_WILL_MESSAGE);
    let Packet::Disconnect(d) = ok(&[0xE0, 7, 0, 5, 0x11, 0, 0, 0, 9], V5) else { panic!() };
    assert_eq!(d.session_expiry_interval, Some(9));
    assert!(matches!(err(&[0xE0, 1, 0x01], V5), DecodeError::InvalidReasonCode { .. }));
    assert_eq!(err(&[0xE0, 4, 0, 2, 0x21, 0], V5).reason_code(), 0x81);

    let v5 = ProtocolVersion::V5;
    assert_eq!(enc(&Packet::Disconnect(Disconnect::default()), v5), [0xE0, 0]);
    let d = Disconnect { reason_code: reason::SESSION_TAKEN_OVER, ..Default::default() };
    assert_eq!(enc(&Packet::Disconnect(d.clone()), v5), [0xE0, 1, 0x8E]);
    assert_eq!(enc(&Packet::Disconnect(d), ProtocolVersion::V311), [0xE0, 0]);
    round_trip(&Packet::Disconnect(Disconnect::with_reason(0x8B, "bye")), v5);
}

#[test]
fn auth() {
    assert_eq!(ok(&[0xF0, 0], V5), Packet::Auth(Auth::default()));
    let Packet::Auth(a) = ok(&[0xF0, 9, 0x18, 7, 0x15, 0, 1, b'm', 0x16, 0, 0], V5) else { panic!() };
    assert_eq!(a.reason_code, reason::CONTINUE_AUTHENTICATION);
    assert!(matches!(err(&[0xF0, 1, 0x01], V5), DecodeError::InvalidReasonCode { .. }));
    assert_eq!(err(&[0xF0, 5, 0x19, 3, 0x16, 0, 0], V5).reason_code(), 0x82);
    let mut out = BytesMut::new();
    assert_eq!(
        encode(&Packet::Auth(Auth::default()), ProtocolVersion::V311, &mut out),
        Err(EncodeError::NotInVersion { packet: PacketType::Auth })
    );
    assert!(out.is_empty());
    round_trip(&Packet::Auth(a), ProtocolVersion::V5);
}

// ---------------------------------------------------------------- encoder

#[test]
fn encode_errors_append_nothing() {
    let mut out = BytesMut::from(&b"xy"[..]);
    let p = Packet::Publish(Publish { topic: "t".repeat(70_000), ..Default::default() });
    assert_eq!(
        encode(&p, ProtocolVersion::V311, &mut out),
        Err(EncodeError::StringTooLong { packet: PacketType::Publish, len: 70_000 })
    );
    assert_eq!(&out[..], b"xy");
    let p = Packet::Publish(Publish { topic: "t".into(), qos: QoS::AtLeastOnce, ..Default::default() });
    assert_eq!(
        encode(&p, ProtocolVersion::V5, &mut out),
        Err(EncodeError::MissingPacketId { packet: PacketType::Publish })
    );
    let c = Connect { password: Some(Bytes::from_static(b"p")), ..Default::default() };
    assert_eq!(
        encode(&Packet::Connect(c.clone()), ProtocolVersion::V311, &mut out),
        Err(EncodeError::PasswordWithoutUsername)
    );
    assert_eq!(&out[..], b"xy");
    round_trip(
        &Packet::Connect(Connect { protocol: ProtocolVersionOrDefault(ProtocolVersion::V5), ..c }),
        ProtocolVersion::V5,
    );
    let mut props = PublishProperties::default();
    props.subscription_identifiers.push(268_435_456);
    let p = Packet::Publish(Publish { topic: "t".into(), properties: props, ..Default::default() });
    assert_eq!(
        encode(&p, ProtocolVersion::V5, &mut out),
        Err(EncodeError::VarIntTooLarge { packet: PacketType::Publish, value: 268_435_456 })
    );
    assert_eq!(&out[..], b"xy");
    let big = Packet::Publish(Publish {
        topic: "t".into(),
        payload: Bytes::from(vec![0u8; MAX_REMAINING_LENGTH]),
        ..Default::default()
    });
    assert!(matches!(encode(&big, ProtocolVersion::V311, &mut out), Err(EncodeError::PacketTooLarge { .. })));
    assert_eq!(encoded_len(&big, ProtocolVersion::V311), 1 + 4 + 3 + MAX_REMAINING_LENGTH);
}

// ---------------------------------------------------------------- round trips

fn user() -> Vec<UserProperty> {
    vec![("a".into(), "1".into()), ("a".into(), "2".into()), ("ü".into(), String::new())]
}

fn full_connect(v: ProtocolVersion) -> Connect {
    let v5 = v.is_v5();
    Connect {
        protocol: ProtocolVersionOrDefault(v),
        clean_start: true,
        keep_alive: 30,
        client_id: "client-1".into(),
        will: Some(LastWill {
            topic: "last/will".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: if v5 {
                WillProperties {
                    will_delay_interval: Some(5),
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(100),
                    content_type: Some("text/plain".into()),
                    response_topic: Some("resp".into()),
                    correlation_data: Some(Bytes::from_static(&[1, 2, 3])),
                    user_properties: user(),
                }
            } else {
                WillProperties::default()
            },
        }),
        username: Some("user".into()),
        password: Some(Bytes::from_static(b"secret")),
        properties: if v5 {
            ConnectProperties {
                session_expiry_interval: Some(u32::MAX),
                receive_maximum: Some(100),
                maximum_packet_size: Some(65536),
                topic_alias_maximum: Some(10),
                request_response_information: Some(true),
                request_problem_information: Some(false),
                user_properties: user(),
                authentication_method: Some("SCRAM".into()),
                authentication_data: Some(Bytes::from_static(b"\x00data")),
            }
        } else {
            ConnectProperties::default()
        },
    }
}

#[test]
fn round_trip_every_packet_both_versions() {
    for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let v5 = v.is_v5();
        let u = || if v5 { user() } else { Vec::new() };
        let rs = || if v5 { Some("why".to_string()) } else { None };
        let code = |c: u8| if v5 { c } else { 0 };
        let packets = vec![
            Packet::Connect(full_connect(v)),
            Packet::Connect(Connect {
                protocol: ProtocolVersionOrDefault(v),
                clean_start: true,
                ..Default::default()
            }),
            Packet::ConnAck(ConnAck {
                session_present: true,
                reason_code: 0,
                properties: if v5 {
                    ConnAckProperties {
                        session_expiry_interval: Some(1),
                        receive_maximum: Some(2),
                        maximum_qos: Some(1),
                        retain_available: Some(false),
                        maximum_packet_size: Some(3),
                        assigned_client_identifier: Some("auto-1".into()),
                        topic_alias_maximum: Some(4),
                        reason_string: Some("ok".into()),
                        user_properties: user(),
                        wildcard_subscription_available: Some(true),
                        subscription_identifiers_available: Some(false),
                        shared_subscription_available: Some(true),
                        server_keep_alive: Some(5),
                        response_information: Some("ri".into()),
                        server_reference: Some("other:1883".into()),
                        authentication_method: Some("m".into()),
                        authentication_data: Some(Bytes::from_static(b"d")),
                    }
                } else {
                    ConnAckProperties::default()
                },
            }),
            Packet::ConnAck(ConnAck { reason_code: reason::SERVER_UNAVAILABLE, ..Default::default() }),
            Packet::Publish(Publish {
                dup: true,
                qos: QoS::AtLeastOnce,
                retain: true,
                topic: "a/b/c".into(),
                packet_id: Some(65535),
                properties: if v5 {
                    PublishProperties {
                        payload_format_indicator: Some(0),
                        message_expiry_interval: Some(0),
                        topic_alias: Some(65535),
                        response_topic: Some("r/t".into()),
                        correlation_data: Some(Bytes::new()),
                        user_properties: user(),
                        subscription_identifiers: vec![1, 127, 128, 16_383, 16_384, 268_435_455],
                        content_type: Some(String::new()),
                    }
                } else {
                    PublishProperties::default()
                },
                payload: Bytes::from(vec![7u8; 300]),
            }),
            Packet::PubAck(PubResp {
                reason_string: rs(),
                user_properties: u(),
                ..PubResp::with_reason(1, code(0x97))
            }),
            Packet::PubRec(PubResp::with_reason(2, code(0x10))),
            Packet::PubRel(PubResp::with_reason(3, code(0x92))),
            Packet::PubComp(PubResp { user_properties: u(), ..PubResp::new(4) }),
            Packet::Subscribe(Subscribe {
                packet_id: 5,
                filters: vec![
                    ("a/+/c".into(), SubscriptionOptions { qos: QoS::ExactlyOnce, ..Default::default() }),
                    (
                        "$share/g/#".into(),
                        SubscriptionOptions {
                            qos: QoS::AtLeastOnce,
                            no_local: false,
                            retain_as_published: v5,
                            retain_handling: if v5 {
                                RetainHandling::SendIfNew
                            } else {
                                RetainHandling::SendAtSubscribe
                            },
                        },
                    ),
                ],
                subscription_identifier: if v5 { Some(268_435_455) } else { None },
                user_properties: u(),
            }),
            Packet::SubAck(SubAck {
                packet_id: 6,
                reason_codes: vec![0, 1, 2, 0x80],
                reason_string: rs(),
                user_properties: u(),
            }),
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 7,
                filters: vec!["x".into()],
                user_properties: u(),
            }),
            Packet::UnsubAck(UnsubAck {
                packet_id: 8,
                reason_codes: if v5 { vec![0, 0x11, 0x8F] } else { Vec::new() },
                reason_string: rs(),
                user_properties: u(),
            }),
            Packet::PingReq,
            Packet::PingResp,
            Packet::Disconnect(if v5 {
                Disconnect {
                    reason_code: 0x04,
                    session_expiry_interval: Some(0),
                    reason_string: Some("bye".into()),
                    user_properties: user(),
                    server_reference: Some("s".into()),
                }
            } else {
                Disconnect::default()
            }),
        ];
        for p in &packets {
            round_trip(p, v);
        }
        if v5 {
            round_trip(
                &Packet::Auth(Auth {
                    reason_code: reason::RE_AUTHENTICATE,
                    authentication_method: Some("m".into()),
                    authentication_data: Some(Bytes::from_static(b"x")),
                    reason_string: Some("r".into()),
                    user_properties: user(),
                }),
                v,
            );
        }
    }
}
