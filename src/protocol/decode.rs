//! Decoding: bytes from the front of a buffer to one [`Packet`].
//!
//! Check-then-parse: the fixed header is read in place; a packet larger than
//! the limit is refused as soon as its remaining length is known, before it is
//! buffered; only a complete packet is split off the buffer (zero-copy: the
//! payload and binary fields are slices of that frame). Parsing then applies
//! every rule of MQTT 3.1.1 / 5.0 that can be checked on one packet alone;
//! rules that need session state (a second CONNECT, topic alias ranges, packet
//! id in use, direction of the packet) are the broker's.

use bytes::{Buf, Bytes, BytesMut};

use super::error::{Ctx, DecodeError};
use super::packet::*;
use super::reason;

/// Decodes one packet from the front of `buf` and advances it; `Ok(None)` means
/// more bytes are needed (nothing is consumed then).
///
/// `version` is None before CONNECT: only CONNECT is accepted then, and it
/// tells the version. `max_packet_size` bounds the whole packet (fixed header
/// included) and also the heap the decoded packet may take.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let ptype = packet_type(first, version)?;
    let ctx = Ctx { packet: ptype, version };
    check_flags(first, ctx)?;

    // Remaining length: a variable byte integer of at most 4 bytes.
    let mut remaining: usize = 0;
    let mut header_len = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(None) };
        remaining |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                // Not the shortest form (MQTT 1.5.5).
                return Err(DecodeError::InvalidVarInt { ctx });
            }
            header_len = 2 + i;
            break;
        }
    }
    if header_len == 0 {
        return Err(DecodeError::InvalidVarInt { ctx });
    }
    let total = header_len + remaining;
    if total > max_packet_size {
        let mut ctx = ctx;
        if ptype == PacketType::Connect {
            // Answer the CONNACK in the client's version when its level is buffered.
            ctx.version = peek_connect_version(&buf[header_len..]);
        }
        return Err(DecodeError::PacketTooLarge { ctx, size: total, max: max_packet_size });
    }
    if buf.len() < total {
        return Ok(None);
    }

    let packet = if remaining == 0 {
        // No body: PINGREQ, PINGRESP, short DISCONNECT/AUTH.
        buf.advance(total);
        decode_empty(ctx)?
    } else if matches!(
        ptype,
        PacketType::Connect | PacketType::ConnAck | PacketType::Publish | PacketType::Auth
    ) {
        // Packets with binary fields: split the frame off so those fields (the
        // PUBLISH payload above all) are zero-copy slices of it.
        let frame = buf.split_to(total).freeze();
        let mut r = Reader::new(&frame, Some(&frame), header_len, ctx, max_packet_size);
        let mut packet = decode_body(&mut r, first)?;
        r.finish()?;
        let payload_at = r.payload_at;
        if let Packet::Publish(p) = &mut packet {
            if payload_at < total {
                let mut payload = frame;
                payload.advance(payload_at);
                p.payload = payload;
            }
        }
        packet
    } else {
        // Everything else is parsed in place: no reference count to touch.
        let mut r = Reader::new(&buf[..total], None, header_len, ctx, max_packet_size);
        let packet = decode_body(&mut r, first)?;
        r.finish()?;
        buf.advance(total);
        packet
    };
    Ok(Some(packet))
}

/// The version a CONNECT declares, read from its first bytes when present.
fn peek_connect_version(body: &[u8]) -> Option<ProtocolVersion> {
    match body.get(..7)? {
        [0, 4, b'M', b'Q', b'T', b'T', 4] => Some(ProtocolVersion::V311),
        [0, 4, b'M', b'Q', b'T', b'T', 5] => Some(ProtocolVersion::V5),
        _ => None,
    }
}

fn packet_type(first: u8, version: Option<ProtocolVersion>) -> Result<PacketType, DecodeError> {
    let t = first >> 4;
    let ptype = match PacketType::from_u8(t) {
        Some(PacketType::Auth) if version == Some(ProtocolVersion::V311) => None,
        other => other,
    };
    let Some(ptype) = ptype else {
        return Err(DecodeError::InvalidPacketType { packet_type: t, byte: first });
    };
    if version.is_none() && ptype != PacketType::Connect {
        return Err(DecodeError::ExpectedConnect { packet: ptype });
    }
    Ok(ptype)
}

/// Fixed header flags (MQTT 2.1.3): PUBLISH carries DUP/QoS/RETAIN, PUBREL,
/// SUBSCRIBE and UNSUBSCRIBE must have 0b0010, every other packet 0.
fn check_flags(first: u8, ctx: Ctx) -> Result<(), DecodeError> {
    let flags = first & 0x0F;
    match ctx.packet {
        PacketType::Publish => {
            let qos = (flags >> 1) & 3;
            if qos == 3 {
                return Err(DecodeError::InvalidQoS { ctx });
            }
            if qos == 0 && flags & 0x08 != 0 {
                return Err(DecodeError::ProtocolViolation { ctx, what: "DUP set with QoS 0" });
            }
            Ok(())
        }
        PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe if flags == 0b0010 => Ok(()),
        PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => {
            Err(DecodeError::InvalidFlags { ctx, flags })
        }
        _ if flags == 0 => Ok(()),
        _ => Err(DecodeError::InvalidFlags { ctx, flags }),
    }
}

/// Packets with remaining length 0.
#[inline]
fn decode_empty(ctx: Ctx) -> Result<Packet, DecodeError> {
    Ok(match ctx.packet {
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => Packet::Disconnect(Disconnect::default()),
        // Only reachable in v5 (packet_type refuses AUTH otherwise).
        PacketType::Auth => Packet::Auth(Auth::default()),
        _ => return Err(DecodeError::UnexpectedEnd { ctx, what: "packet body" }),
    })
}

#[inline(always)]
fn decode_body(r: &mut Reader, first: u8) -> Result<Packet, DecodeError> {
    let v5 = r.ctx.version == Some(ProtocolVersion::V5);
    Ok(match r.ctx.packet {
        PacketType::Connect => Packet::Connect(decode_connect(r)?),
        PacketType::ConnAck => Packet::ConnAck(decode_connack(r, v5)?),
        PacketType::Publish => Packet::Publish(decode_publish(r, first, v5)?),
        PacketType::PubAck => Packet::PubAck(decode_pubresp(r, v5, reason::valid_puback)?),
        PacketType::PubRec => Packet::PubRec(decode_pubresp(r, v5, reason::valid_puback)?),
        PacketType::PubRel => Packet::PubRel(decode_pubresp(r, v5, reason::valid_pubrel)?),
        PacketType::PubComp => Packet::PubComp(decode_pubresp(r, v5, reason::valid_pubrel)?),
        PacketType::Subscribe => Packet::Subscribe(decode_subscribe(r, v5)?),
        PacketType::SubAck => Packet::SubAck(decode_suback(r, v5)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(decode_unsubscribe(r, v5)?),
        PacketType::UnsubAck => Packet::UnsubAck(decode_unsuback(r, v5)?),
        PacketType::PingReq | PacketType::PingResp => {
            return Err(DecodeError::TrailingBytes { ctx: r.ctx, extra: r.left() });
        }
        PacketType::Disconnect => Packet::Disconnect(decode_disconnect(r, v5)?),
        PacketType::Auth => Packet::Auth(decode_auth(r)?),
    })
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name_len = r.u16("protocol name")? as usize;
    let name = r.take(name_len, "protocol name")?;
    let level = r.u8("protocol level")?;
    let version = match (&name[..], level) {
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQTT", level) | (b"MQIsdp", level) => {
            return Err(DecodeError::UnsupportedProtocolVersion { level });
        }
        _ => {
            return Err(DecodeError::InvalidProtocolName {
                name: String::from_utf8_lossy(&name[..name.len().min(32)]).into_owned(),
            });
        }
    };
    r.ctx.version = Some(version);
    let v5 = version.is_v5();

    let flags = r.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::ReservedBits { ctx: r.ctx, what: "connect flags" });
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 3;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if will_qos == 3 {
        return Err(DecodeError::InvalidQoS { ctx: r.ctx });
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::ReservedBits { ctx: r.ctx, what: "will QoS/retain without will flag" });
    }
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = r.u16("keep alive")?;

    let mut properties = ConnectProperties::default();
    if v5 {
        r.properties(|r, id| {
            let p = &mut properties;
            match id {
                0x11 => once(r, id, &mut p.session_expiry_interval, |r| r.u32("property")),
                0x21 => once(r, id, &mut p.receive_maximum, |r| nonzero_u16(r, id, "receive maximum 0")),
                0x27 => {
                    once(r, id, &mut p.maximum_packet_size, |r| nonzero_u32(r, id, "maximum packet size 0"))
                }
                0x22 => once(r, id, &mut p.topic_alias_maximum, |r| r.u16("property")),
                0x19 => once(r, id, &mut p.request_response_information, |r| flag_byte(r, id)),
                0x17 => once(r, id, &mut p.request_problem_information, |r| flag_byte(r, id)),
                0x26 => user_property(r, &mut p.user_properties),
                0x15 => once(r, id, &mut p.authentication_method, |r| r.string()),
                0x16 => once(r, id, &mut p.authentication_data, |r| r.binary()),
                _ => Err(r.bad_property(id)),
            }
        })?;
        if properties.authentication_data.is_some() && properties.authentication_method.is_none() {
            return Err(DecodeError::InvalidPropertyValue {
                ctx: r.ctx,
                id: 0x16,
                what: "authentication data without authentication method",
            });
        }
    }

    let client_id = r.string()?;
    if !v5 && client_id.is_empty() && !clean_start {
        // MQTT 3.1.1 3.1.3.1: answered with return code 2 (identifier rejected).
        return Err(DecodeError::EmptyClientIdWithoutCleanSession);
    }

    let will = if will_flag {
        let mut wp = WillProperties::default();
        if v5 {
            r.properties(|r, id| {
                let p = &mut wp;
                match id {
                    0x18 => once(r, id, &mut p.will_delay_interval, |r| r.u32("property")),
                    0x01 => once(r, id, &mut p.payload_format_indicator, |r| format_indicator(r, id)),
                    0x02 => once(r, id, &mut p.message_expiry_interval, |r| r.u32("property")),
                    0x03 => once(r, id, &mut p.content_type, |r| r.string()),
                    0x08 => once(r, id, &mut p.response_topic, |r| response_topic(r, id)),
                    0x09 => once(r, id, &mut p.correlation_data, |r| r.binary()),
                    0x26 => user_property(r, &mut p.user_properties),
                    _ => Err(r.bad_property(id)),
                }
            })?;
        }
        let topic = r.string()?;
        check_topic_name(r, &topic, false)?;
        let payload = r.binary()?;
        Some(LastWill {
            topic,
            payload,
            qos: QoS::from_u8(will_qos).unwrap_or_default(),
            retain: will_retain,
            properties: wp,
        })
    } else {
        None
    };

    let username = if username_flag { Some(r.string()?) } else { None };
    let password = if password_flag { Some(r.binary()?) } else { None };

    Ok(Connect {
        protocol: ProtocolVersionOrDefault(version),
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_connack(r: &mut Reader, v5: bool) -> Result<ConnAck, DecodeError> {
    let flags = r.u8("acknowledge flags")?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::ReservedBits { ctx: r.ctx, what: "connect acknowledge flags" });
    }
    let session_present = flags & 1 != 0;
    let code = r.u8("reason code")?;
    let reason_code = if v5 {
        if !reason::valid_connack(code) {
            return Err(DecodeError::InvalidReasonCode { ctx: r.ctx, code });
        }
        code
    } else {
        match reason::connack_from_v311_code(code) {
            Some(c) => c,
            None => return Err(DecodeError::InvalidReasonCode { ctx: r.ctx, code }),
        }
    };
    if session_present && reason_code != reason::SUCCESS {
        return Err(DecodeError::ProtocolViolation {
            ctx: r.ctx,
            what: "session present with an error code",
        });
    }
    let mut properties = ConnAckProperties::default();
    if v5 {
        r.properties(|r, id| {
            let p = &mut properties;
            match id {
                0x11 => once(r, id, &mut p.session_expiry_interval, |r| r.u32("property")),
                0x21 => once(r, id, &mut p.receive_maximum, |r| nonzero_u16(r, id, "receive maximum 0")),
                0x24 => once(r, id, &mut p.maximum_qos, |r| match r.u8("property")? {
                    v @ (0 | 1) => Ok(v),
                    _ => Err(r.invalid(id, "maximum QoS other than 0 or 1")),
                }),
                0x25 => once(r, id, &mut p.retain_available, |r| flag_byte(r, id)),
                0x27 => {
                    once(r, id, &mut p.maximum_packet_size, |r| nonzero_u32(r, id, "maximum packet size 0"))
                }
                0x12 => once(r, id, &mut p.assigned_client_identifier, |r| r.string()),
                0x22 => once(r, id, &mut p.topic_alias_maximum, |r| r.u16("property")),
                0x1F => once(r, id, &mut p.reason_string, |r| r.string()),
                0x26 => user_property(r, &mut p.user_properties),
                0x28 => once(r, id, &mut p.wildcard_subscription_available, |r| flag_byte(r, id)),
                0x29 => once(r, id, &mut p.subscription_identifiers_available, |r| flag_byte(r, id)),
                0x2A => once(r, id, &mut p.shared_subscription_available, |r| flag_byte(r, id)),
                0x13 => once(r, id, &mut p.server_keep_alive, |r| r.u16("property")),
                0x1A => once(r, id, &mut p.response_information, |r| r.string()),
                0x1C => once(r, id, &mut p.server_reference, |r| r.string()),
                0x15 => once(r, id, &mut p.authentication_method, |r| r.string()),
                0x16 => once(r, id, &mut p.authentication_data, |r| r.binary()),
                _ => Err(r.bad_property(id)),
            }
        })?;
        if properties.authentication_data.is_some() && properties.authentication_method.is_none() {
            return Err(r.invalid(0x16, "authentication data without authentication method"));
        }
    }
    Ok(ConnAck { session_present, reason_code, properties })
}

fn decode_publish(r: &mut Reader, first: u8, v5: bool) -> Result<Publish, DecodeError> {
    let dup = first & 0x08 != 0;
    // check_flags refused QoS 3 already.
    let qos = QoS::from_u8((first >> 1) & 3).unwrap_or_default();
    let retain = first & 0x01 != 0;
    let topic = r.string()?;
    let packet_id = if qos != QoS::AtMostOnce { Some(r.packet_id()?) } else { None };
    let mut properties = PublishProperties::default();
    if v5 {
        r.properties(|r, id| {
            let p = &mut properties;
            match id {
                0x01 => once(r, id, &mut p.payload_format_indicator, |r| format_indicator(r, id)),
                0x02 => once(r, id, &mut p.message_expiry_interval, |r| r.u32("property")),
                0x23 => once(r, id, &mut p.topic_alias, |r| nonzero_u16(r, id, "topic alias 0")),
                0x08 => once(r, id, &mut p.response_topic, |r| response_topic(r, id)),
                0x09 => once(r, id, &mut p.correlation_data, |r| r.binary()),
                0x26 => user_property(r, &mut p.user_properties),
                0x0B => {
                    let v = subscription_identifier(r, id)?;
                    r.push(&mut p.subscription_identifiers, v)
                }
                0x03 => once(r, id, &mut p.content_type, |r| r.string()),
                _ => Err(r.bad_property(id)),
            }
        })?;
    }
    check_topic_name(r, &topic, properties.topic_alias.is_some())?;
    // The caller turns the rest of the frame into the payload without copying.
    r.payload_at = r.pos;
    r.pos = r.end;
    Ok(Publish { dup, qos, retain, topic, packet_id, properties, payload: Bytes::new() })
}

#[inline]
fn decode_pubresp(r: &mut Reader, v5: bool, valid: fn(u8) -> bool) -> Result<PubResp, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut resp = PubResp::new(packet_id);
    if v5 && r.left() > 0 {
        resp.reason_code = r.reason(valid)?;
        if r.left() > 0 {
            reason_properties(r, &mut resp.reason_string, &mut resp.user_properties)?;
        }
    }
    Ok(resp)
}

fn decode_subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut sub = Subscribe { packet_id, ..Default::default() };
    if v5 {
        r.properties(|r, id| match id {
            0x0B => once(r, id, &mut sub.subscription_identifier, |r| subscription_identifier(r, id)),
            0x26 => user_property(r, &mut sub.user_properties),
            _ => Err(r.bad_property(id)),
        })?;
    }
    if r.left() == 0 {
        return Err(DecodeError::NoTopicFilters { ctx: r.ctx });
    }
    while r.left() > 0 {
        let filter = r.string()?;
        let o = r.u8("subscription options")?;
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if o & reserved != 0 {
            return Err(DecodeError::ReservedBits { ctx: r.ctx, what: "subscription options" });
        }
        let Some(qos) = QoS::from_u8(o & 3) else {
            return Err(DecodeError::ProtocolViolation { ctx: r.ctx, what: "subscription QoS 3" });
        };
        let retain_handling = match (o >> 4) & 3 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::ProtocolViolation { ctx: r.ctx, what: "retain handling 3" }),
        };
        let no_local = o & 0x04 != 0;
        if no_local && filter.starts_with("$share/") {
            return Err(DecodeError::ProtocolViolation {
                ctx: r.ctx,
                what: "no local on a shared subscription",
            });
        }
        let options =
            SubscriptionOptions { qos, no_local, retain_as_published: o & 0x08 != 0, retain_handling };
        r.push(&mut sub.filters, (filter, options))?;
    }
    Ok(sub)
}

fn decode_suback(r: &mut Reader, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut ack = SubAck { packet_id, ..Default::default() };
    if v5 {
        reason_properties(r, &mut ack.reason_string, &mut ack.user_properties)?;
    }
    let valid: fn(u8) -> bool = if v5 { reason::valid_suback } else { |c| matches!(c, 0..=2 | 0x80) };
    ack.reason_codes = r.reason_codes(valid)?;
    Ok(ack)
}

fn decode_unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut unsub = Unsubscribe { packet_id, ..Default::default() };
    if v5 {
        r.properties(|r, id| match id {
            0x26 => user_property(r, &mut unsub.user_properties),
            _ => Err(r.bad_property(id)),
        })?;
    }
    if r.left() == 0 {
        return Err(DecodeError::NoTopicFilters { ctx: r.ctx });
    }
    while r.left() > 0 {
        let filter = r.string()?;
        r.push(&mut unsub.filters, filter)?;
    }
    Ok(unsub)
}

fn decode_unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut ack = UnsubAck { packet_id, ..Default::default() };
    if v5 {
        reason_properties(r, &mut ack.reason_string, &mut ack.user_properties)?;
        ack.reason_codes = r.reason_codes(reason::valid_unsuback)?;
    }
    Ok(ack)
}

fn decode_disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, DecodeError> {
    let mut d = Disconnect::default();
    if !v5 {
        return Err(DecodeError::TrailingBytes { ctx: r.ctx, extra: r.left() });
    }
    d.reason_code = r.reason(reason::valid_disconnect)?;
    if r.left() > 0 {
        r.properties(|r, id| match id {
            0x11 => once(r, id, &mut d.session_expiry_interval, |r| r.u32("property")),
            0x1F => once(r, id, &mut d.reason_string, |r| r.string()),
            0x26 => user_property(r, &mut d.user_properties),
            0x1C => once(r, id, &mut d.server_reference, |r| r.string()),
            _ => Err(r.bad_property(id)),
        })?;
    }
    Ok(d)
}

fn decode_auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    let mut a = Auth { reason_code: r.reason(reason::valid_auth)?, ..Default::default() };
    if r.left() > 0 {
        r.properties(|r, id| match id {
            0x15 => once(r, id, &mut a.authentication_method, |r| r.string()),
            0x16 => once(r, id, &mut a.authentication_data, |r| r.binary()),
            0x1F => once(r, id, &mut a.reason_string, |r| r.string()),
            0x26 => user_property(r, &mut a.user_properties),
            _ => Err(r.bad_property(id)),
        })?;
        if a.authentication_data.is_some() && a.authentication_method.is_none() {
            return Err(r.invalid(0x16, "authentication data without authentication method"));
        }
    }
    Ok(a)
}

/// The property block of acks: reason string and user properties only.
fn reason_properties(
    r: &mut Reader,
    reason_string: &mut Option<String>,
    user: &mut Vec<UserProperty>,
) -> Result<(), DecodeError> {
    r.properties(|r, id| match id {
        0x1F => once(r, id, reason_string, |r| r.string()),
        0x26 => user_property(r, user),
        _ => Err(r.bad_property(id)),
    })
}

/// Topic name rules a decoder can check (MQTT 4.7.1, 4.7.3, 3.3.2.1): no
/// wildcards; empty only with a topic alias (and never for a will).
fn check_topic_name(r: &Reader, topic: &str, has_alias: bool) -> Result<(), DecodeError> {
    if topic.is_empty() && !has_alias {
        return Err(DecodeError::TopicNameInvalid {
            ctx: r.ctx,
            what: "empty topic name without topic alias",
        });
    }
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(DecodeError::TopicNameInvalid { ctx: r.ctx, what: "wildcard in topic name" });
    }
    Ok(())
}

/// Sets a property that may appear only once.
fn once<T>(
    r: &mut Reader,
    id: u8,
    slot: &mut Option<T>,
    read: impl FnOnce(&mut Reader) -> Result<T, DecodeError>,
) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty { ctx: r.ctx, id });
    }
    *slot = Some(read(r)?);
    Ok(())
}

fn user_property(r: &mut Reader, list: &mut Vec<UserProperty>) -> Result<(), DecodeError> {
    let k = r.string()?;
    let v = r.string()?;
    r.push(list, (k, v))
}

fn nonzero_u16(r: &mut Reader, id: u8, what: &'static str) -> Result<u16, DecodeError> {
    match r.u16("property")? {
        0 => Err(r.invalid(id, what)),
        v => Ok(v),
    }
}

fn nonzero_u32(r: &mut Reader, id: u8, what: &'static str) -> Result<u32, DecodeError> {
    match r.u32("property")? {
        0 => Err(r.invalid(id, what)),
        v => Ok(v),
    }
}

fn flag_byte(r: &mut Reader, id: u8) -> Result<bool, DecodeError> {
    match r.u8("property")? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(r.invalid(id, "value other than 0 or 1")),
    }
}

fn format_indicator(r: &mut Reader, id: u8) -> Result<u8, DecodeError> {
    match r.u8("property")? {
        v @ (0 | 1) => Ok(v),
        _ => Err(r.invalid(id, "payload format indicator other than 0 or 1")),
    }
}

fn subscription_identifier(r: &mut Reader, id: u8) -> Result<u32, DecodeError> {
    match r.vbi()? {
        0 => Err(r.invalid(id, "subscription identifier 0")),
        v => Ok(v as u32),
    }
}

fn response_topic(r: &mut Reader, id: u8) -> Result<String, DecodeError> {
    let t = r.string()?;
    // MQTT 3.3.2.3.5: a topic name, so no wildcards.
    if t.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(r.invalid(id, "wildcard in response topic"));
    }
    Ok(t)
}

/// Every property identifier MQTT 5 defines (2.2.2.2).
fn known_property(id: u8) -> bool {
    matches!(
        id,
        0x01 | 0x02
            | 0x03
            | 0x08
            | 0x09
            | 0x0B
            | 0x11
            | 0x12
            | 0x13
            | 0x15
            | 0x16
            | 0x17
            | 0x18
            | 0x19
            | 0x1A
            | 0x1C
            | 0x1F
            | 0x21..=0x2A
    )
}

/// A cursor over one complete packet. `end` is the end of the packet or, while
/// reading a property block, the end of that block.
struct Reader<'a> {
    buf: &'a [u8],
    /// The same bytes as a frame, when binary fields should be zero-copy.
    frame: Option<&'a Bytes>,
    pos: usize,
    end: usize,
    ctx: Ctx,
    /// Heap bytes the decoded packet may still take (Strings and Vecs); keeps a
    /// crafted packet of many tiny items from costing many times its size.
    budget: usize,
    /// The max_packet_size the budget started from, for the error.
    max: usize,
    /// Where a PUBLISH payload starts.
    payload_at: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], frame: Option<&'a Bytes>, pos: usize, ctx: Ctx, max: usize) -> Reader<'a> {
        Reader { buf, frame, pos, end: buf.len(), ctx, budget: max, max, payload_at: buf.len() }
    }

    #[inline]
    fn left(&self) -> usize {
        self.end - self.pos
    }

    #[inline]
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.left() < n {
            return Err(DecodeError::UnexpectedEnd { ctx: self.ctx, what });
        }
        Ok(())
    }

    #[inline]
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        let v = self.buf[self.pos];
        self.pos += 1;
        Ok(v)
    }

    #[inline]
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        let v = u16::from_be_bytes([self.buf[self.pos], self.buf[self.pos + 1]]);
        self.pos += 2;
        Ok(v)
    }

    #[inline]
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        let b = &self.buf[self.pos..self.pos + 4];
        let v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        self.pos += 4;
        Ok(v)
    }

    fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16("packet identifier")? {
            0 => Err(DecodeError::ZeroPacketId { ctx: self.ctx }),
            v => Ok(v),
        }
    }

    fn reason(&mut self, valid: fn(u8) -> bool) -> Result<u8, DecodeError> {
        let code = self.u8("reason code")?;
        if !valid(code) {
            return Err(DecodeError::InvalidReasonCode { ctx: self.ctx, code });
        }
        Ok(code)
    }

    /// The rest of the packet as reason codes (SUBACK, UNSUBACK payloads).
    fn reason_codes(&mut self, valid: fn(u8) -> bool) -> Result<Vec<u8>, DecodeError> {
        let n = self.left();
        self.charge(n)?;
        let codes = &self.buf[self.pos..self.end];
        if let Some(&code) = codes.iter().find(|&&c| !valid(c)) {
            return Err(DecodeError::InvalidReasonCode { ctx: self.ctx, code });
        }
        let v = codes.to_vec();
        self.pos = self.end;
        Ok(v)
    }

    /// A variable byte integer inside the packet (property length, subscription id).
    fn vbi(&mut self) -> Result<usize, DecodeError> {
        let mut v = 0usize;
        for i in 0..4 {
            let b = self.u8("variable byte integer")?;
            v |= ((b & 0x7F) as usize) << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(DecodeError::InvalidVarInt { ctx: self.ctx });
                }
                return Ok(v);
            }
        }
        Err(DecodeError::InvalidVarInt { ctx: self.ctx })
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        let b = match self.frame {
            Some(f) => f.slice(self.pos..self.pos + n),
            None => {
                self.charge(n)?;
                Bytes::copy_from_slice(&self.buf[self.pos..self.pos + n])
            }
        };
        self.pos += n;
        Ok(b)
    }

    /// Binary data: 2-byte length then bytes, zero-copy.
    fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16("binary data length")? as usize;
        self.take(n, "binary data")
    }

    /// UTF-8 encoded string (MQTT 1.5.4): well-formed, without U+0000.
    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u16("string length")? as usize;
        self.need(n, "string")?;
        self.charge(n)?;
        let raw = &self.buf[self.pos..self.pos + n];
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8 { ctx: self.ctx })?;
        if raw.contains(&0) {
            return Err(DecodeError::NullCharacter { ctx: self.ctx });
        }
        let s = s.to_owned();
        self.pos += n;
        Ok(s)
    }

    fn charge(&mut self, n: usize) -> Result<(), DecodeError> {
        match self.budget.checked_sub(n) {
            Some(b) => {
                self.budget = b;
                Ok(())
            }
            None => Err(DecodeError::MemoryLimit { ctx: self.ctx, max: self.max }),
        }
    }

    /// Pushes onto a Vec, growing it by doubling under the memory budget.
    fn push<T>(&mut self, v: &mut Vec<T>, item: T) -> Result<(), DecodeError> {
        if v.len() == v.capacity() {
            let add = v.capacity().max(4);
            self.charge(add.saturating_mul(std::mem::size_of::<T>()))?;
            v.reserve_exact(add);
        }
        v.push(item);
        Ok(())
    }

    /// Reads a property block, calling `f` for each property identifier.
    fn properties(
        &mut self,
        mut f: impl FnMut(&mut Reader, u8) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        let len = self.vbi()?;
        self.need(len, "properties")?;
        let outer_end = self.end;
        self.end = self.pos + len;
        while self.pos < self.end {
            // Identifiers are variable byte integers, but all defined ones are
            // one byte; a longer one is unknown anyway.
            let id = self.u8("property identifier")?;
            f(self, id)?;
        }
        self.end = outer_end;
        Ok(())
    }

    fn bad_property(&self, id: u8) -> DecodeError {
        if known_property(id) {
            DecodeError::PropertyNotAllowed { ctx: self.ctx, id }
        } else {
            DecodeError::UnknownProperty { ctx: self.ctx, id }
        }
    }

    fn invalid(&self, id: u8, what: &'static str) -> DecodeError {
        DecodeError::InvalidPropertyValue { ctx: self.ctx, id, what }
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.left() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes { ctx: self.ctx, extra }),
        }
    }
}
